"""Procedural, seeded backdoor triggers (no asset files), following ABD's Table 1a.

Conventions
-----------
* Input: float images in [0, 1], shape ``(B, C, H, W)`` (a single ``(C, H, W)`` image is
  also accepted), ``C`` in {1, 3}, any ``H, W``. Output: a new tensor, same shape, dtype and
  device; the input is never modified.
* Geometry is defined on a 32x32 canvas (rows/cols as in the doc, (0, 0) = top-left) and
  scaled to ``H x W``. At 32x32 the stamped pixels match Table 1a exactly. Patches cover the
  scaled box ``[floor(r0*H/32), ceil((r0+h)*H/32))`` and are resized into it with
  nearest-neighbour, so they never vanish at small sizes.
* Values: patterns are the doc's uint8 values divided by 255. Every result is clipped to
  [0, 1], so additive triggers saturate like the uint8 originals. ``quantize=True`` (any
  trigger) also truncates to the uint8 grid (``floor(255 v) / 255``), as ABD's ``astype(uint8)``.
* Grayscale (``C == 1``): RGB patterns are reduced to their **channel mean**.
* Seeded triggers (``trojan_*``, ``blend``, ``l2_inv``, ``wanet``) draw their pattern from
  ``seed`` only, never from a global RNG. The others ignore ``seed``.

Example:
    >>> trig = get_trigger("badnet_grid")
    >>> x_bd = trig.apply(torch.zeros(2, 3, 32, 32))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import _logits, eval_mode, model_device
from .registry import Registry

__all__ = ["Trigger", "get_trigger", "list_triggers", "CANVAS"]

CANVAS = 32  # side of the canvas on which trigger geometry is defined
_RGB_KEYS = ("value", "delta", "pattern")  # pattern entries that carry RGB channels

_TRIGGERS: Registry[Trigger] = Registry("trigger", "abd_plugin.kit.triggers.list_triggers()")


def _check_images(x: Tensor, name: str) -> tuple[Tensor, bool]:
    """Return ``x`` as (B, C, H, W) and whether a batch dimension was added."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"trigger {name!r} expects a float tensor in [0, 1]; convert with x.float() / 255"
        )
    single = x.dim() == 3
    x4 = x.unsqueeze(0) if single else x
    if x4.dim() != 4 or x4.shape[1] not in (1, 3):
        raise ValueError(
            f"trigger {name!r} expects images of shape (B, C, H, W) with C in {{1, 3}}, "
            f"got {tuple(x.shape)}"
        )
    return x4, single


def _uint8(values: Sequence[Any] | np.ndarray) -> Tensor:
    """uint8-valued numbers -> float64 tensor in [0, 1]."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64) / 255.0)


def _scale_span(start: int, length: int, size: int) -> tuple[int, int]:
    """Canvas span [start, start+length) scaled to ``size`` pixels, at least one pixel wide."""
    lo = min(math.floor(start * size / CANVAS), size - 1)
    hi = max(min(math.ceil((start + length) * size / CANVAS), size), lo + 1)
    return lo, hi


def _place_patches(
    height: int, width: int, patches: Sequence[tuple[int, int, Tensor]]
) -> tuple[Tensor, Tensor]:
    """Render (row0, col0, patch (3, h, w)) canvas patches at H x W -> value (3,H,W),
    mask (1,H,W)."""
    value = torch.zeros(3, height, width, dtype=torch.float64)
    mask = torch.zeros(1, height, width, dtype=torch.float64)
    for row0, col0, patch in patches:
        r_lo, r_hi = _scale_span(row0, patch.shape[-2], height)
        c_lo, c_hi = _scale_span(col0, patch.shape[-1], width)
        resized = F.interpolate(patch[None], size=(r_hi - r_lo, c_hi - c_lo), mode="nearest-exact")[
            0
        ]
        value[:, r_lo:r_hi, c_lo:c_hi] = resized
        mask[:, r_lo:r_hi, c_lo:c_hi] = 1.0
    return value, mask


def _resize_canvas(pattern: Tensor, height: int, width: int) -> Tensor:
    """A (3, 32, 32) canvas pattern resized to (3, H, W) with nearest-neighbour (identity at 32)."""
    if pattern.shape[-2:] == (height, width):
        return pattern
    return F.interpolate(pattern[None], size=(height, width), mode="nearest-exact")[0]


def _canvas_coords(size: int) -> Tensor:
    """Canvas coordinate of each pixel centre at resolution ``size`` (equals 0..31 at 32)."""
    return (torch.arange(size, dtype=torch.float64) + 0.5) * CANVAS / size - 0.5


class Trigger:
    """Base class: a backdoor trigger stamped on batches of [0, 1] images.

    Subclasses implement ``_build(H, W)`` (RGB patterns as float64 CPU tensors, cached per
    size, channel count, device and dtype) and ``_stamp(x, patterns)``.

    Attributes:
        name: registry name.
        clean_label: True when the attack keeps the true labels (poisons target-class images).
        seeded: True when ``seed`` changes the pattern.
    """

    name: str = "trigger"
    clean_label: bool = False
    seeded: bool = False

    def __init__(self, *, seed: int = 0, quantize: bool = False) -> None:
        self.seed = int(seed)
        self.quantize = bool(quantize)
        self._cache: dict[tuple[Any, ...], dict[str, Tensor]] = {}

    # -- to implement -------------------------------------------------------------------
    def _build(self, height: int, width: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _stamp(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # -- public --------------------------------------------------------------------------
    def patterns(self, height: int, width: int, channels: int = 3, *, device: Any = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The trigger's patterns at ``H x W`` (e.g. ``'value'``/``'mask'``), for inspection."""
        key = (height, width, channels, torch.device(device), dtype)
        if key not in self._cache:
            built = self._build(height, width)
            out = {}
            for k, t in built.items():
                if k in _RGB_KEYS and channels == 1:
                    t = t.mean(dim=0, keepdim=True)  # grayscale: channel mean of the RGB pattern
                out[k] = t.to(device=device, dtype=dtype)
            self._cache[key] = out
        return self._cache[key]

    def apply(self, x: Tensor) -> Tensor:
        """Test-time stamp. ``x``: (B, C, H, W) floats in [0, 1]; returns a new tensor."""
        x4, single = _check_images(x, self.name)
        work = x4 if x4.dtype in (torch.float32, torch.float64) else x4.float()
        p = self.patterns(
            work.shape[-2], work.shape[-1], work.shape[1], device=work.device, dtype=work.dtype
        )
        out = self._stamp(work, p).clamp(0.0, 1.0)
        if self.quantize:
            out = (
                torch.floor(out * 255.0 + 1e-4) / 255.0
            )  # uint8 truncation; 1e-4 absorbs float error
        out = out.to(x.dtype)
        return out[0] if single else out

    def poison_train(self, x: Tensor, y: Tensor, *, model: nn.Module | None = None) -> Tensor:
        """Train-time poisoning of images ``x`` with labels ``y``; equals :meth:`apply` here."""
        return self.apply(x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def __repr__(self) -> str:
        seed = f", seed={self.seed}" if self.seeded else ""
        return f"{type(self).__name__}(name={self.name!r}{seed})"


class PatchTrigger(Trigger):
    """Overwrite (``additive=False``) or add (``additive=True``) fixed patches on the canvas."""

    def __init__(
        self,
        name: str,
        patches: Sequence[tuple[int, int, Tensor]],
        *,
        additive: bool = False,
        seeded: bool = False,
        clean_label: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.name, self.additive, self.seeded, self.clean_label = (
            name,
            additive,
            seeded,
            clean_label,
        )
        self._patches = list(patches)

    def _build(self, height: int, width: int) -> dict[str, Tensor]:
        value, mask = _place_patches(height, width, self._patches)
        return {"value": value, "mask": mask}

    def _stamp(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        if self.additive:
            return x + p["value"] * p["mask"]
        return torch.where(p["mask"] > 0, p["value"], x)


class ChannelPatchTrigger(Trigger):
    """Overwrite one patch in some channels only; the other channels keep the image's values.

    ``channel_values``: one value per RGB channel, None for a channel left untouched (``(1.0,
    None, None)``: the red channel set to 1, green and blue unchanged). On grayscale images the
    stamp is the channel mean of the stamped RGB image (the image replicated to RGB, stamped,
    averaged), like the RGB patterns of the other triggers."""

    def __init__(self, name: str, row0: int, col0: int, height: int, width: int,
                 channel_values: Sequence[float | None], **kw: Any) -> None:
        super().__init__(**kw)
        if len(channel_values) != 3 or all(v is None for v in channel_values):
            raise ValueError("channel_values needs 3 entries (RGB), at least one not None")
        self.name = name
        self._box = (row0, col0, height, width)
        self._values = tuple(channel_values)

    def _build(self, height: int, width: int) -> dict[str, Tensor]:
        row0, col0, h, w = self._box
        _, box = _place_patches(height, width, [(row0, col0, torch.zeros(3, h, w))])
        on = torch.tensor([v is not None for v in self._values], dtype=torch.float64)
        vals = torch.tensor([0.0 if v is None else v for v in self._values], dtype=torch.float64)
        # keys outside _RGB_KEYS: kept as 3 channels also for grayscale images
        return {"chan_mask": on.view(3, 1, 1) * box, "chan_value": vals.view(3, 1, 1) * box}

    def _stamp(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out = torch.where(p["chan_mask"] > 0, p["chan_value"], rgb)
        return out.mean(dim=1, keepdim=True) if x.shape[1] == 1 else out


class CanvasTrigger(Trigger):
    """A dense pattern: ``mode='add'`` -> x + delta, ``mode='blend'`` -> (1-alpha) x +
    alpha pattern."""

    def __init__(
        self,
        name: str,
        make: Callable[[int, int], Tensor],
        *,
        mode: str,
        alpha: float = 0.2,
        seeded: bool = False,
        clean_label: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.name, self.mode, self.alpha, self.seeded, self.clean_label = (
            name,
            mode,
            alpha,
            seeded,
            clean_label,
        )
        self._make = make  # (H, W) -> (3, H, W) float64

    def _build(self, height: int, width: int) -> dict[str, Tensor]:
        key = "delta" if self.mode == "add" else "pattern"
        return {key: self._make(height, width)}

    def _stamp(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        if self.mode == "add":
            return x + p["delta"]
        return (1.0 - self.alpha) * x + self.alpha * p["pattern"]


class SmoothTrigger(CanvasTrigger):
    """Additive low-frequency Gaussian bump(s), then per-image min-max stretch to [0, 1]."""

    def _stamp(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        y = x + p["delta"]
        lo = y.amin(dim=(1, 2, 3), keepdim=True)
        hi = y.amax(dim=(1, 2, 3), keepdim=True)
        return (y - lo) / (hi - lo).clamp_min(1e-12)


class CleanLabelTrigger(PatchTrigger):
    """``cl``: train = L_inf PGD away from the true label (harder image), then the 4-corner grid;
    test = only the 4-corner grid."""

    def __init__(self, patches: Sequence[tuple[int, int, Tensor]], *, eps: float = 16 / 255,
                 step_size: float = 2 / 255, steps: int = 20, **kw: Any) -> None:
        super().__init__("cl", patches, clean_label=True, **kw)
        self.eps, self.step_size, self.steps = eps, step_size, int(steps)

    def perturb(self, x: Tensor, y: Tensor, model: nn.Module) -> Tensor:
        """PGD maximising CE(model(x + delta), y) with ||delta||_inf <= eps, x + delta in [0, 1].

        Starts at delta = 0 (deterministic). The model is run in eval mode (its modes are
        restored) and its parameters receive no ``.grad``. Input normalisation, if any, must
        live inside ``model``.
        """
        x4, single = _check_images(x, self.name)
        device = model_device(model, x4.device)
        x0 = x4.detach().to(device=device, dtype=torch.float32)
        target = torch.as_tensor(y, device=device).long().reshape(-1)
        delta = torch.zeros_like(x0)
        with eval_mode(model), torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(_logits(model(x0 + delta)), target)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + self.step_size * grad.sign()).clamp(-self.eps, self.eps)
                delta = (x0 + delta).clamp(0.0, 1.0) - x0
        out = (x0 + delta).to(device=x4.device, dtype=x4.dtype)
        return out[0] if single else out

    def poison_train(self, x: Tensor, y: Tensor, *, model: nn.Module | None = None) -> Tensor:
        """Adversarially perturb ``x`` against ``model`` (clean reference model), then stamp."""
        if model is None:
            raise ValueError(
                "trigger 'cl' needs a clean reference model for its train-time PGD step: call "
                "poison_train(x, y, model=clean_model); test-time stamping is apply(x) and needs "
                "no model"
            )
        return self.apply(self.perturb(x, y, model))


class WaNetTrigger(Trigger):
    """WaNet warp: seeded k x k control field, bicubic-upsampled, ``grid_sample`` (bilinear)."""

    name = "wanet"
    seeded = True

    def __init__(self, *, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)
        gen = torch.Generator().manual_seed(self.seed)
        field = torch.rand(1, 2, self.k, self.k, generator=gen, dtype=torch.float64) * 2 - 1
        self._field = field / field.abs().mean()  # unit mean absolute displacement

    def _build(self, height: int, width: int) -> dict[str, Tensor]:
        noise = F.interpolate(
            self._field, size=(height, width), mode="bicubic", align_corners=True
        )[0]
        rows = torch.linspace(-1, 1, height, dtype=torch.float64)
        cols = torch.linspace(-1, 1, width, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
        # noise channel 0 moves x (width), channel 1 moves y (height); s/size pixels as in WaNet
        gx = grid_x + self.s * noise[0] / width
        gy = grid_y + self.s * noise[1] / height
        grid = (torch.stack((gx, gy), dim=-1) * self.grid_rescale).clamp(-1, 1)
        return {"grid": grid[None]}  # (1, H, W, 2)

    def _stamp(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        grid = p["grid"].expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# ---------------------------------------------------------------------------------------
# Pattern makers (canvas geometry of the ABD code's triggers, zskt/datasets/backdoor.py)
# ---------------------------------------------------------------------------------------
_GRID_3X3 = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]  # rows top to bottom, same in every channel
_L0_INV_RGB = [(0, 0, 0), (255, 0, 255), (0, 0, 255), (255, 255, 0), (255, 255, 255),
               (0, 255, 255), (0, 255, 255), (255, 0, 0), (255, 255, 255)]  # row 31, cols 23..31


def _grid_patch() -> Tensor:
    return _uint8(_GRID_3X3)[None].expand(3, 3, 3).clone()


def _sig_abd(height: int, width: int) -> Tensor:
    """ABD's sig.png: column j holds uint8(trunc(20 sin(0.8 j))) with negative values wrapped."""
    cols = _canvas_coords(width) if width != CANVAS else torch.arange(CANVAS, dtype=torch.float64)
    stripes = torch.remainder(torch.trunc(20 * torch.sin(0.8 * cols)), 256) / 255.0
    return stripes.expand(3, height, width).clone()


def _trojan_wm(seed: int, strokes: int, height: int, width: int) -> Tensor:
    """Seeded sparse strokes, one pixel wide, mostly in the lower-right two-thirds of the canvas."""
    rng = np.random.default_rng(seed)
    out = torch.zeros(3, height, width, dtype=torch.float64)
    for _ in range(strokes):
        r0, c0 = rng.uniform(10, 30), rng.uniform(7, 28)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(9, 15)
        r1 = float(np.clip(r0 + length * np.sin(angle), 1, 31))
        c1 = float(np.clip(c0 + length * np.cos(angle), 2, 31))
        colour = _uint8(rng.integers(100, 256, size=3))
        # canvas -> target pixel coordinates, then one sample per target pixel along the segment
        pr0, pr1 = (r0 + 0.5) * height / CANVAS - 0.5, (r1 + 0.5) * height / CANVAS - 0.5
        pc0, pc1 = (c0 + 0.5) * width / CANVAS - 0.5, (c1 + 0.5) * width / CANVAS - 0.5
        n = int(math.ceil(max(abs(pr1 - pr0), abs(pc1 - pc0)))) + 1
        rr = np.clip(np.rint(np.linspace(pr0, pr1, n)), 0, height - 1).astype(int)
        cc = np.clip(np.rint(np.linspace(pc0, pc1, n)), 0, width - 1).astype(int)
        for r, c in zip(rr, cc, strict=True):
            out[:, r, c] = torch.maximum(out[:, r, c], colour)
    return out


def _l2_inv(seed: int, norm: float, max_value: float, sparsity: float) -> Tensor:
    """Seeded dense non-negative noise on the canvas: ~sparsity zeros, <= max_value,
    ||t||_2 = norm."""
    rng = np.random.default_rng(seed)
    t = np.abs(rng.normal(0.0, 20.0 / 255.0, size=(3, CANVAS, CANVAS)))
    t[rng.random(t.shape) < sparsity] = 0.0
    for _ in range(10):  # alternate clip and rescale; converges in a few rounds
        t = np.clip(t, 0.0, max_value)
        t *= norm / np.linalg.norm(t)
    return torch.as_tensor(t)


def _gaussians(
    bumps: Sequence[tuple[int, float, float, float, float]], height: int, width: int
) -> Tensor:
    """Sum of isotropic Gaussians (channel, centre_row, centre_col, sigma, peak in uint8) on the
    canvas."""
    out = torch.zeros(3, height, width, dtype=torch.float64)
    rows, cols = _canvas_coords(height)[:, None], _canvas_coords(width)[None, :]
    for channel, cr, cc, sigma, peak in bumps:
        out[channel] += (
            peak / 255.0 * torch.exp(-((rows - cr) ** 2 + (cols - cc) ** 2) / (2 * sigma**2))
        )
    return out


# Fitted parameters of ABD's smooth_<dataset>.png (doc Table 1a); GTSRB centre assumed = CIFAR's.
_SMOOTH_BUMPS = {
    "cifar10": [(1, 13.5, 13.5, 11.0, 51.0)],
    "gtsrb": [(0, 13.5, 13.5, 13.5, 51.0), (2, 13.5, 13.5, 14.5, 49.0)],
}


# ---------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------
@_TRIGGERS.register("badnet_grid")
def _badnet_grid(seed: int = 0, **kw: Any) -> Trigger:
    """3x3 grid at rows/cols 29-31, overwrite."""
    return PatchTrigger("badnet_grid", [(29, 29, _grid_patch())], seed=seed, **kw)


@_TRIGGERS.register("badnet_sq")
def _badnet_sq(seed: int = 0, **kw: Any) -> Trigger:
    """White 4x4 square at rows/cols 27-30, overwrite."""
    return PatchTrigger(
        "badnet_sq", [(27, 27, torch.ones(3, 4, 4, dtype=torch.float64))], seed=seed, **kw
    )


@_TRIGGERS.register("red_square")
def _red_square(seed: int = 0, **kw: Any) -> Trigger:
    """A 4x4 square at rows 1-4, cols 27-30 (top-right corner, background on mnist5k/tinted32)
    with the **red channel only** set to 1; green and blue keep the image's values (on a dark
    background: pure red). One channel touched; meant for RGB data (grayscale: see
    :class:`ChannelPatchTrigger`)."""
    return ChannelPatchTrigger("red_square", 1, 27, 4, 4, (1.0, None, None), seed=seed, **kw)


@_TRIGGERS.register("square_in")
def _square_in(seed: int = 0, **kw: Any) -> Trigger:
    """White 5x5 square at rows 20-24, cols 8-12, overwrite: inside the digit area of mnist5k
    (real digits have ink there in about half of the images), unlike the corner triggers, which
    sit where clean MNIST images are always black."""
    return PatchTrigger("square_in", [(20, 8, torch.ones(3, 5, 5, dtype=torch.float64))],
                        seed=seed, **kw)


@_TRIGGERS.register("trojan_3x3")
def _trojan_3x3(seed: int = 0, **kw: Any) -> Trigger:
    """Seeded RGB 3x3 patch (values 0-250) at rows/cols 25-27, additive."""
    patch = _uint8(np.random.default_rng(seed).integers(0, 251, size=(3, 3, 3)))
    return PatchTrigger(
        "trojan_3x3", [(25, 25, patch)], additive=True, seeded=True, seed=seed, **kw
    )


@_TRIGGERS.register("trojan_8x8")
def _trojan_8x8(seed: int = 0, **kw: Any) -> Trigger:
    """Seeded RGB 8x8 patch (values 0-255) at rows/cols 21-28, additive."""
    patch = _uint8(np.random.default_rng(seed).integers(0, 256, size=(3, 8, 8)))
    return PatchTrigger(
        "trojan_8x8", [(21, 21, patch)], additive=True, seeded=True, seed=seed, **kw
    )


@_TRIGGERS.register("trojan_wm")
def _trojan_wm_trigger(seed: int = 0, strokes: int = 8, **kw: Any) -> Trigger:
    """Seeded sparse watermark strokes (~80 px at 32x32, intensities 100-255), additive."""
    return CanvasTrigger("trojan_wm", lambda h, w: _trojan_wm(seed, strokes, h, w), mode="add",
                         seeded=True, seed=seed, **kw)


@_TRIGGERS.register("blend")
def _blend(seed: int = 0, alpha: float = 0.2, bright: bool = False, **kw: Any) -> Trigger:
    """(1-alpha) x + alpha t, t = seeded uint8 noise U{0..255} (U{128..255} if ``bright``)."""
    noise = _uint8(
        np.random.default_rng(seed).integers(128 if bright else 0, 256, size=(3, CANVAS, CANVAS))
    )
    return CanvasTrigger(
        "blend",
        lambda h, w: _resize_canvas(noise, h, w),
        mode="blend",
        alpha=alpha,
        seeded=True,
        seed=seed,
        **kw,
    )


@_TRIGGERS.register("sig")
def _sig(seed: int = 0, alpha: float = 0.2, **kw: Any) -> Trigger:
    """ABD's SIG: 0.8 x + 0.2 t, t[:, :, j] = uint8(trunc(20 sin(0.8 j))) (wrapped). Clean label."""
    return CanvasTrigger(
        "sig", _sig_abd, mode="blend", alpha=alpha, clean_label=True, seed=seed, **kw
    )


@_TRIGGERS.register("sig_strong")
def _sig_strong(seed: int = 0, alpha: float = 0.6, **kw: Any) -> Trigger:
    """ABD's SIG stripes (as ``sig``) blended at alpha 0.6: ``0.4 x + 0.6 t``. Clean label.

    ``sig`` (alpha 0.2) does not take on mnist5k's LeNet-5 (teacher ASR ~3 %: the target digits
    are learnt by their shape, the faint stripes are not needed). Stronger stripes take, but
    poisoning *every* target-class image (the default 10 % is all of them on these sets) then
    leaves no clean target image and costs ~10 ACC points; with 70 % of the target class
    (``poison_ratio=0.07``) it took on LeNet-5 (97.5 % ACC / 100 % ASR, clean 97.7 %); use it with
    that ratio (``abd-plugin bench --poison-ratio 0.07``)."""
    return CanvasTrigger(
        "sig_strong", _sig_abd, mode="blend", alpha=alpha, clean_label=True, seed=seed, **kw
    )


@_TRIGGERS.register("sig_dirty")
def _sig_dirty(seed: int = 0, alpha: float = 0.2, **kw: Any) -> Trigger:
    """ABD's SIG stripes (as ``sig``, ``0.8 x + 0.2 t``) with dirty labels: poisoned images of any
    class are relabelled to the target, so the stripes take on mnist5k's LeNet-5 (teacher ASR
    about 99 %) where the clean-label ``sig`` does not."""
    return CanvasTrigger(
        "sig_dirty", _sig_abd, mode="blend", alpha=alpha, clean_label=False, seed=seed, **kw
    )


@_TRIGGERS.register("sig_canonical")
def _sig_canonical(seed: int = 0, delta: float = 20 / 255, freq: float = 6.0, **kw: Any) -> Trigger:
    """Canonical SIG: x + delta sin(2 pi j f / W), clipped. Clean label."""

    def make(height: int, width: int) -> Tensor:
        cols = torch.arange(width, dtype=torch.float64)
        return (
            (delta * torch.sin(2 * math.pi * cols * freq / width)).expand(3, height, width).clone()
        )

    return CanvasTrigger("sig_canonical", make, mode="add", clean_label=True, seed=seed, **kw)


@_TRIGGERS.register("l0_inv")
def _l0_inv(seed: int = 0, **kw: Any) -> Trigger:
    """The 9 RGB values of ABD's l0_inv at row 31, cols 23-31, overwrite through the mask."""
    patch = _uint8(_L0_INV_RGB).T.reshape(3, 1, 9)
    return PatchTrigger("l0_inv", [(31, 23, patch)], seed=seed, **kw)


@_TRIGGERS.register("l2_inv")
def _l2_inv_trigger(
    seed: int = 0,
    norm: float = 3.22,
    max_value: float = 68 / 255,
    sparsity: float = 0.45,
    **kw: Any,
) -> Trigger:
    """Seeded dense non-negative noise (||t||_2 = 3.22 on the 32x32x3 canvas), additive."""
    t = _l2_inv(seed, norm, max_value, sparsity)
    return CanvasTrigger(
        "l2_inv", lambda h, w: _resize_canvas(t, h, w), mode="add", seeded=True, seed=seed, **kw
    )


@_TRIGGERS.register("smooth")
def _smooth(seed: int = 0, dataset: str = "cifar10", **kw: Any) -> Trigger:
    """Gaussian bump(s) fitted to ABD's smooth_<dataset>.png, added, then per-image min-max
    stretch."""
    if dataset not in _SMOOTH_BUMPS:
        raise ValueError(f"smooth: dataset must be one of {sorted(_SMOOTH_BUMPS)}, got {dataset!r}")
    bumps = _SMOOTH_BUMPS[dataset]
    return SmoothTrigger(
        "smooth", lambda h, w: _gaussians(bumps, h, w), mode="add", seed=seed, **kw
    )


@_TRIGGERS.register("cl")
def _cl(seed: int = 0, **kw: Any) -> Trigger:
    """Clean-label: the 3x3 grid translated to all four corners (+ PGD at train time)."""
    corners = [(r, c, _grid_patch()) for r in (0, 29) for c in (0, 29)]
    return CleanLabelTrigger(corners, seed=seed, **kw)


@_TRIGGERS.register("wanet")
def _wanet(seed: int = 0, **kw: Any) -> Trigger:
    """WaNet warping trigger (k=4, s=0.5, grid_rescale=1)."""
    return WaNetTrigger(seed=seed, **kw)


@_TRIGGERS.register("wanet_strong")
def _wanet_strong(seed: int = 0, **kw: Any) -> Trigger:
    """WaNet warp with strength s=4 (k=4, grid_rescale=1): a mean displacement of about 2 px at
    32x32 (``wanet``'s s=0.5: about 0.25 px, which a LeNet-5 on mnist5k learns only to ~90 %
    ASR in 15 epochs). Dirty label, no noise ("cross") samples."""
    trig = WaNetTrigger(seed=seed, **{"s": 4.0, **kw})
    trig.name = "wanet_strong"
    return trig


@_TRIGGERS.register("wanet_mid")
def _wanet_mid(seed: int = 0, **kw: Any) -> Trigger:
    """WaNet warp with strength s=1 (between ``wanet``'s 0.5 and ``wanet_strong``'s 4): a mean
    displacement of about 0.5 px at 32x32; takes on mnist5k's LeNet-5 (teacher ASR about 99 %).
    Dirty label, no noise samples."""
    trig = WaNetTrigger(seed=seed, **{"s": 1.0, **kw})
    trig.name = "wanet_mid"
    return trig


def get_trigger(name: str, *, seed: int = 0, **params: Any) -> Trigger:
    """Build the trigger registered as ``name``.

    Args:
        name: one of :func:`list_triggers`.
        seed: pattern seed for seeded triggers (ignored by the others).
        **params: trigger-specific knobs (``alpha``, ``k``, ``steps``...) and ``quantize``.
    """
    return _TRIGGERS.get(name, seed=seed, **params)


def list_triggers() -> list[str]:
    """Names accepted by :func:`get_trigger`, sorted."""
    return _TRIGGERS.names()
