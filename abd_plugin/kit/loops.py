"""Reference data-free KD loops, written the way a user writes them.

Each loop is plain PyTorch; the defense enters only through ``with ABDGuard(...)`` in automatic
mode (SV at the teacher's forward on synthesis batches, SR at the student's optimizer step), so a
benchmark of these loops exercises the real plug-in path. The fixed-transfer-set loop (``ood``)
uses the explicit ``guard.suspicious`` + ``guard.reweight`` seam, as the paper does.

Registered loops (``list_loops()``):

* ``zskt``: adversarial generator vs student (Micaelli & Storkey 2019): per iteration one
  generator step maximising ``KL(p_T || p_S)`` and ``n_student_steps`` student steps minimising it
  on the same latent batch; optional attention transfer is omitted (LeNet has no blocks).
* ``dfad``: as ZSKT with the L1 distance between logits (Fang et al. 2019).
* ``deepinversion``: optimise a batch of pixels against the teacher's BatchNorm statistics
  (forward hooks on the teacher's BN layers), a class-conditional CE and a TV prior; then distill
  the student on the pool of inverted images.
* ``cmi``: simplified CMI: a generator re-initialised every round is trained on BN statistics +
  one-hot CE + adversarial divergence + an instance-contrastive term against a memory bank of
  earlier samples' teacher features; the student distills from the growing image pool.
  Simplified: one global view (no local crops), features are the teacher's penultimate
  activations through a fixed random projection instead of a learned head.
* ``ood``: KD on a fixed out-of-distribution transfer set (random crops of one procedural or
  user-given image, flips, CutMix), SV by re-weighting suspicious samples.
* ``clean``: plain KD on the real training images (the reference).

Input units (``normalize``, the dataset's :attr:`~abd_plugin.kit.datasets.DatasetInfo.normalize`;
None for the kit's [0, 1] datasets). Teacher and student are always fed what the dataset's models
expect. With ``normalize=None`` everything is in [0, 1]: the generators end in a sigmoid and
DeepInversion optimises pixels through a sigmoid. With a normalisation ``(mean, std)``:

* ``zskt``/``dfad``: the generator ends in an affine-free BatchNorm (``out="bn"``), so its samples
  are ~N(0, 1) per channel, i.e. already in normalised units (the DFAD host's convention; ZSKT's
  own generator ends in a BatchNorm with affine parameters), and are fed as they are;
* ``deepinversion``: pixels are optimised directly in normalised units, started at N(0, 1) and
  clamped after every step to the normalised image of [0, 1] (``(0 - mean) / std`` to
  ``(1 - mean) / std`` per channel);
* ``cmi``: its sigmoid generator makes [0, 1] images that are normalised before the teacher (the
  CMI / Fast-Datafree hosts' convention);
* ``ood`` and ``clean``: the [0, 1] transfer images / real images are normalised.

Normalising is :func:`~abd_plugin.kit.datasets.to_model_input` everywhere; with a guard, the
audit's ``input_range`` is set to the normalised range unless the configuration gives one.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abd_plugin import ABDConfig, ABDGuard, DefenseHook, GuardReport

from .datasets import Normalization, model_input_range, to_model_input
from .models import get_model
from .registry import Registry

Progress = Callable[[int, int, str], None] | None


@dataclass(frozen=True)
class DistillConfig:
    """Budget and optimiser settings of a reference loop."""

    iterations: int = 400
    """Outer iterations (ZSKT/DFAD: one generator step + n_student_steps each; inversion loops:
    student steps in total)."""
    batch_size: int = 64
    n_student_steps: int = 5
    lr_student: float = 2e-3
    lr_generator: float = 1e-3
    z_dim: int = 100
    generator_width: int = 16
    """``ngf`` of the generator (channels 2ngf-2ngf-ngf); 64 is ZSKT's CIFAR generator."""
    temperature: float = 1.0
    # inversion loops (deepinversion, cmi)
    synth_rounds: int = 8
    synth_steps: int = 60
    # ood
    ood_patches: int = 2000
    seed: int = 0


@dataclass
class DistillResult:
    student: nn.Module
    #: the guard's report (None without a guard)
    report: GuardReport | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    student_steps: int = 0


_LOOPS: Registry[DistillResult] = Registry(
    "distillation method", "abd_plugin.kit.loops.list_loops()"
)


def list_loops() -> list[str]:
    return _LOOPS.names()


def _kl(
    t_logits: Tensor, s_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1),
                    reduction=reduction, log_target=True) * (t * t)


def _guard(teacher: nn.Module, student: nn.Module, abd: ABDConfig | None, total_steps: int,
           hooks: Sequence[DefenseHook] = (), normalize: Normalization | None = None) -> Any:
    """The guard a user writes: ``ABDGuard(teacher, student, config=abd, hooks=hooks)``; the
    loop's length is filled in only where an SR window needs it (``sr_start_fraction`` without
    ``total_steps``), so the default config runs exactly as a bare ``ABDGuard(teacher, student)``.
    With normalised inputs the valid input range is filled in too (unless given): the normalised
    image of [0, 1] (a user states it the same way). Extra hooks without an ABD configuration
    run alone (audit, eraser, SV and SR all off)."""
    if abd is None and not hooks:
        return nullcontext()
    if abd is None:
        abd = ABDConfig(sv=False, sr=False, audit=False, erase=False)
    sr = abd.retrospection
    if sr.enabled and sr.start_fraction is not None and sr.total_steps is None:
        abd = abd.replace(total_steps=total_steps)
    if normalize is not None and abd.input_range is None:
        lo, hi = model_input_range(normalize)
        abd = abd.replace(input_range=(min(lo), max(hi)))
    return ABDGuard(teacher, student, config=abd, hooks=hooks)


def _report(guard: Any) -> GuardReport | None:
    return guard.report() if isinstance(guard, ABDGuard) else None


def distill(method: str, teacher: nn.Module, student: nn.Module, *, img_shape: tuple[int, int, int],
            num_classes: int, config: DistillConfig = DistillConfig(), abd: ABDConfig | None = None,
            real_data: tuple[Tensor, Tensor] | None = None, progress: Progress = None,
            eval_fn: Callable[[nn.Module], dict[str, float]] | None = None, eval_every: int = 0,
            ood_source: Tensor | None = None, hooks: Sequence[DefenseHook] = (),
            normalize: Normalization | None = None) -> DistillResult:
    """Distill ``teacher`` into ``student`` with loop ``method``, defended by ``abd`` (None:
    vanilla).

    Args:
        img_shape: (C, H, W) of the teacher's input.
        real_data: (x, y) training images in image space ([0, 1]); needed by ``clean``, ignored
            by the data-free loops.
        normalize: ``(mean, std)`` per channel when the models are fed normalised images (the
            dataset's ``DatasetInfo.normalize``); None: [0, 1] inputs. See the module doc.
        eval_fn: called on the student every ``eval_every`` student steps (history for plots).
        hooks: extra :class:`~abd_plugin.DefenseHook` objects for the loop's guard (e.g.
            :class:`~abd_plugin.InputGradientAlignment`); with ``abd=None`` they run in a guard
            whose SV and SR are off.
    """
    fn = _LOOPS.factory(method)
    torch.manual_seed(config.seed)
    teacher.eval()
    return fn(teacher, student, img_shape=img_shape, num_classes=num_classes, cfg=config, abd=abd,
              real_data=real_data, progress=progress, eval_fn=eval_fn, eval_every=eval_every,
              ood_source=ood_source, hooks=tuple(hooks), normalize=normalize)


class _Tracker:
    def __init__(
        self, student: nn.Module, total: int, progress: Progress, eval_fn: Any, every: int
    ) -> None:
        self.student, self.total, self.progress, self.eval_fn, self.every = (
            student,
            total,
            progress,
            eval_fn,
            every,
        )
        self.steps = 0
        self.history: list[dict[str, float]] = []

    def tick(self, msg: str = "") -> None:
        self.steps += 1
        if self.progress:
            self.progress(self.steps, self.total, msg)
        if (
            self.eval_fn
            and self.every
            and (self.steps % self.every == 0 or self.steps == self.total)
        ):
            was = self.student.training
            row = {"step": float(self.steps), **self.eval_fn(self.student)}
            self.student.train(was)
            self.history.append(row)


def _student_setup(
    student: nn.Module,
    cfg: DistillConfig,
    total: int,
    progress: Progress,
    eval_fn: Any,
    eval_every: int,
) -> tuple[torch.optim.Optimizer, Any, _Tracker]:
    """Adam + cosine schedule over ``total`` student steps, and the progress/eval tracker."""
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr_student)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    student.train()
    return opt, sched, _Tracker(student, total, progress, eval_fn, eval_every)


def _adversarial_loop(distance: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., DistillResult]:
    def loop(
        teacher: nn.Module,
        student: nn.Module,
        *,
        img_shape: tuple[int, int, int],
        num_classes: int,
        cfg: DistillConfig,
        abd: ABDConfig | None,
        progress: Progress,
        eval_fn: Any,
        eval_every: int,
        hooks: Sequence[DefenseHook] = (),
        normalize: Normalization | None = None,
        **_kw: Any,
    ) -> DistillResult:
        c, h, w = img_shape
        # [0, 1] inputs: a sigmoid head; normalised inputs: an affine-free BN head (samples in
        # normalised units, fed as they are)
        head: dict[str, Any] = {} if normalize is None else {"out": "bn"}
        generator = get_model(
            "generator_zskt",
            in_channels=c,
            channels=c,
            z_dim=cfg.z_dim,
            img_size=h,
            ngf=cfg.generator_width,
            **head,
        )
        total = cfg.iterations * cfg.n_student_steps
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_generator)
        opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_student)
        sch_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, cfg.iterations)
        sch_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, total)
        track = _Tracker(student, total, progress, eval_fn, eval_every)
        student.train()
        generator.train()
        guard = _guard(teacher, student, abd, total, hooks, normalize)
        with guard:
            for _ in range(cfg.iterations):
                z = torch.randn(cfg.batch_size, cfg.z_dim)
                # generator step: maximise the teacher-student distance
                x = generator(z)
                loss_g = -distance(teacher(x), student(x))
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
                sch_g.step()
                # student steps on the same latents, with the updated generator (computed once:
                # the output does not change between student steps)
                with torch.no_grad():
                    x = generator(z)
                for _ in range(cfg.n_student_steps):
                    with torch.no_grad():
                        t = teacher(x)
                    loss_s = distance(t, student(x))
                    opt_s.zero_grad()
                    loss_s.backward()
                    opt_s.step()
                    sch_s.step()
                    track.tick(f"loss_s {loss_s.item():.3f}")
            rep = _report(guard)
        return DistillResult(student, rep, track.history, track.steps)

    return loop


_LOOPS.register("zskt")(_adversarial_loop(lambda t, s: _kl(t, s)))
_LOOPS.register("dfad")(_adversarial_loop(lambda t, s: F.l1_loss(s, t)))


@_LOOPS.register("clean")
def _clean(
    teacher: nn.Module,
    student: nn.Module,
    *,
    cfg: DistillConfig,
    real_data: tuple[Tensor, Tensor] | None,
    abd: ABDConfig | None,
    progress: Progress,
    eval_fn: Any,
    eval_every: int,
    hooks: Sequence[DefenseHook] = (),
    normalize: Normalization | None = None,
    **_kw: Any,
) -> DistillResult:
    if real_data is None:
        raise ValueError("method 'clean' distills on real data: pass real_data=(x, y)")
    total = cfg.iterations * cfg.n_student_steps
    opt_s, sch_s, track = _student_setup(student, cfg, total, progress, eval_fn, eval_every)
    g = torch.Generator().manual_seed(cfg.seed)
    guard = _guard(teacher, student, abd, total, hooks, normalize)
    real = to_model_input(real_data[0], normalize)
    with guard:
        _distill_from_pool(teacher, student, [real], total, cfg, opt_s, sch_s, track, g)
        rep = _report(guard)
    return DistillResult(student, rep, track.history, track.steps)


def _bn_statistics_loss(teacher: nn.Module) -> tuple[list[Any], Callable[[], Tensor]]:
    """DeepInversion's feature-statistics prior: forward hooks on the teacher's BN layers."""
    terms: list[Tensor] = []
    handles = []

    def hook(mod: nn.BatchNorm2d, inp: tuple[Tensor, ...], _out: Tensor) -> None:
        x = inp[0]
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
        r_mean, r_var = mod.running_mean, mod.running_var
        assert r_mean is not None and r_var is not None  # hooked BN layers track statistics
        terms.append(torch.norm(mean - r_mean, 2) + torch.norm(var - r_var, 2))

    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(hook))

    def collect() -> Tensor:
        out = torch.stack(terms).sum() if terms else torch.zeros(())
        terms.clear()
        return out

    return handles, collect


def _tv(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def _distill_from_pool(
    teacher: nn.Module,
    student: nn.Module,
    pool: list[Tensor],
    steps: int,
    cfg: DistillConfig,
    opt: torch.optim.Optimizer,
    sched: Any,
    track: _Tracker,
    g: torch.Generator,
) -> None:
    data = torch.cat(pool)
    for _ in range(steps):
        x = data[torch.randint(len(data), (cfg.batch_size,), generator=g)]
        with torch.no_grad():
            t = teacher(x)
        loss = _kl(t, student(x), cfg.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        track.tick(f"kd {loss.item():.3f}")


@_LOOPS.register("deepinversion")
def _deepinversion(
    teacher: nn.Module,
    student: nn.Module,
    *,
    img_shape: tuple[int, int, int],
    num_classes: int,
    cfg: DistillConfig,
    abd: ABDConfig | None,
    progress: Progress,
    eval_fn: Any,
    eval_every: int,
    hooks: Sequence[DefenseHook] = (),
    normalize: Normalization | None = None,
    **_kw: Any,
) -> DistillResult:
    total = cfg.iterations * cfg.n_student_steps
    per_round = max(1, total // cfg.synth_rounds)
    total = per_round * cfg.synth_rounds
    opt_s, sched, track = _student_setup(student, cfg, total, progress, eval_fn, eval_every)
    g = torch.Generator().manual_seed(cfg.seed)
    handles, bn_loss = _bn_statistics_loss(teacher)
    pool: list[Tensor] = []
    guard = _guard(teacher, student, abd, total, hooks, normalize)
    # [0, 1] inputs: pixels through a sigmoid; normalised inputs: pixels in the model's units,
    # clamped to the normalised image of [0, 1]
    box = None
    if normalize is not None:
        lo, hi = model_input_range(normalize)
        box = (torch.tensor(lo).view(-1, 1, 1), torch.tensor(hi).view(-1, 1, 1))

    def pixels(v: Tensor) -> Tensor:
        return torch.sigmoid(v) if box is None else v

    try:
        with guard:
            for _ in range(cfg.synth_rounds):
                # invert: optimise pixels (kept in the valid input range, see above)
                v = torch.randn((cfg.batch_size,) + tuple(img_shape), generator=g)
                if box is not None:
                    v = torch.maximum(torch.minimum(v, box[1]), box[0])
                v.requires_grad_(True)
                y = torch.randint(num_classes, (cfg.batch_size,), generator=g)
                opt_x = torch.optim.Adam([v], lr=0.1)
                for _ in range(cfg.synth_steps):
                    x = pixels(v)
                    flip = torch.rand(()) < 0.5
                    x_in = x.flip(-1) if flip else x
                    bn_loss()  # drop stale terms
                    logits = teacher(x_in)
                    loss = F.cross_entropy(logits, y) + 0.1 * bn_loss() + 0.05 * _tv(x)
                    opt_x.zero_grad()
                    loss.backward()
                    opt_x.step()
                    if box is not None:
                        with torch.no_grad():
                            v.copy_(torch.maximum(torch.minimum(v, box[1]), box[0]))
                pool.append(pixels(v).detach().clone())
                _distill_from_pool(teacher, student, pool, per_round, cfg, opt_s, sched, track, g)
            rep = _report(guard)
    finally:
        for h in handles:
            h.remove()
    return DistillResult(student, rep, track.history, track.steps)


class _Features:
    """Captures the input of the teacher's last Linear layer (penultimate features)."""

    def __init__(self, teacher: nn.Module) -> None:
        last = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise ValueError("cmi needs a teacher whose head is an nn.Linear")
        self.value: Tensor | None = None
        self.handle = last[-1].register_forward_pre_hook(self._hook)

    def _hook(self, _m: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.value = args[0]


@_LOOPS.register("cmi")
def _cmi(
    teacher: nn.Module,
    student: nn.Module,
    *,
    img_shape: tuple[int, int, int],
    num_classes: int,
    cfg: DistillConfig,
    abd: ABDConfig | None,
    progress: Progress,
    eval_fn: Any,
    eval_every: int,
    hooks: Sequence[DefenseHook] = (),
    normalize: Normalization | None = None,
    **_kw: Any,
) -> DistillResult:
    c, h, w = img_shape
    total = cfg.iterations * cfg.n_student_steps
    per_round = max(1, total // cfg.synth_rounds)
    total = per_round * cfg.synth_rounds
    opt_s, sched, track = _student_setup(student, cfg, total, progress, eval_fn, eval_every)
    g = torch.Generator().manual_seed(cfg.seed)
    handles, bn_loss = _bn_statistics_loss(teacher)
    feats = _Features(teacher)
    proj: Tensor | None = None
    bank: list[Tensor] = []
    pool: list[Tensor] = []
    guard = _guard(teacher, student, abd, total, hooks, normalize)
    try:
        with guard:
            for _ in range(cfg.synth_rounds):
                gen = get_model(
                    "generator_cmi",
                    in_channels=c,
                    channels=c,
                    z_dim=cfg.z_dim,
                    img_size=h,
                    ngf=cfg.generator_width,
                )
                opt_g = torch.optim.Adam(
                    gen.parameters(), lr=cfg.lr_generator * 10, betas=(0.5, 0.999)
                )
                z = torch.randn(cfg.batch_size, cfg.z_dim, generator=g)
                y = torch.randint(num_classes, (cfg.batch_size,), generator=g)
                best: Tensor | None = None
                best_loss = math.inf
                for _ in range(cfg.synth_steps):
                    x = to_model_input(gen(z), normalize)  # a [0, 1] image, then the model's units
                    bn_loss()
                    t = teacher(x)
                    f = feats.value
                    l_bn = bn_loss()
                    assert f is not None
                    if proj is None:
                        proj = torch.randn(f.shape[1], 64, generator=g) / math.sqrt(f.shape[1])
                    anchor = F.normalize(f @ proj, dim=1)
                    with torch.no_grad():
                        teacher(x.flip(-1))
                        f_flip = feats.value
                        assert f_flip is not None
                        positive = F.normalize(f_flip @ proj, dim=1)
                    negatives = (
                        torch.cat(bank[-8:]) if bank else anchor.new_zeros((0, anchor.shape[1]))
                    )
                    logits_c = (
                        torch.cat(
                            [(anchor * positive).sum(1, keepdim=True), anchor @ negatives.T], 1
                        )
                        / 0.1
                    )
                    l_cr = F.cross_entropy(logits_c, torch.zeros(len(anchor), dtype=torch.long))
                    l_adv = -_kl(t, student(x))
                    loss = l_bn + F.cross_entropy(t, y) + 0.5 * l_adv + 0.8 * l_cr
                    opt_g.zero_grad()
                    loss.backward()
                    opt_g.step()
                    if loss.item() < best_loss:
                        best_loss, best = loss.item(), x.detach().clone()
                assert best is not None
                pool.append(best)
                with torch.no_grad():
                    teacher(best)
                    f_best = feats.value
                    assert f_best is not None and proj is not None
                    bank.append(F.normalize(f_best @ proj, dim=1).detach())
                _distill_from_pool(teacher, student, pool, per_round, cfg, opt_s, sched, track, g)
            rep = _report(guard)
    finally:
        for hd in handles:
            hd.remove()
        feats.handle.remove()
    return DistillResult(student, rep, track.history, track.steps)


def procedural_image(size: int = 256, channels: int = 3, seed: int = 0) -> Tensor:
    """A seeded natural-looking image (overlapping blobs, edges and textures) in [0, 1] used as
    the single source image of the OOD transfer set when the user gives none."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.zeros(3, size, size)
    for _ in range(40):
        cy, cx, r = torch.rand(3, generator=g)
        col = torch.rand(3, 1, 1, generator=g)
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.02 + 0.15 * r) ** 2))
        img = img * (1 - blob) + col * blob
    for _ in range(12):
        fy, fx = (torch.rand(2, generator=g) * 40 + 4).tolist()
        ph = float(torch.rand((), generator=g)) * 6.28
        amp = float(torch.rand((), generator=g)) * 0.15
        img = img + amp * torch.sin(fy * yy + fx * xx + ph)
    img = (img - img.min()) / (img.max() - img.min())
    return img if channels == 3 else img.mean(0, keepdim=True)


def ood_transfer_set(
    n: int, img_shape: tuple[int, int, int], source: Tensor | None = None, seed: int = 0
) -> Tensor:
    """``n`` random crops (random scale, flips) of one image, resized to ``img_shape``."""
    c, h, w = img_shape
    src = procedural_image(256, c, seed) if source is None else source
    if src.shape[0] != c:
        src = src.mean(0, keepdim=True) if c == 1 else src.expand(c, -1, -1)
    g = torch.Generator().manual_seed(seed + 1)
    H, W = src.shape[-2:]
    out = torch.empty(n, c, h, w)
    for i in range(n):
        s = int(min(H, W) * (0.1 + 0.5 * float(torch.rand((), generator=g))))
        top = int(torch.randint(H - s + 1, (), generator=g))
        left = int(torch.randint(W - s + 1, (), generator=g))
        crop = src[:, top:top + s, left:left + s].unsqueeze(0)
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if torch.rand((), generator=g) < 0.5:
            out[i] = out[i].flip(-1)
    return out


def _cutmix(x: Tensor, g: torch.Generator, beta: float = 0.25) -> Tensor:
    lam = float(torch.distributions.Beta(beta, beta).sample())
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (), generator=g)), int(torch.randint(w, (), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(len(x), generator=g)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out


@_LOOPS.register("ood")
def _ood(
    teacher: nn.Module,
    student: nn.Module,
    *,
    img_shape: tuple[int, int, int],
    cfg: DistillConfig,
    abd: ABDConfig | None,
    progress: Progress,
    eval_fn: Any,
    eval_every: int,
    ood_source: Tensor | None = None,
    hooks: Sequence[DefenseHook] = (),
    normalize: Normalization | None = None,
    **_kw: Any,
) -> DistillResult:
    data = to_model_input(ood_transfer_set(cfg.ood_patches, img_shape, ood_source, cfg.seed),
                          normalize)
    total = cfg.iterations * cfg.n_student_steps
    opt_s, sched, track = _student_setup(student, cfg, total, progress, eval_fn, eval_every)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    guard = _guard(teacher, student, abd, total, hooks, normalize)
    sv_on = isinstance(guard, ABDGuard) and guard.sv is not None
    with guard:
        for _ in range(total):
            x = _cutmix(data[torch.randint(len(data), (cfg.batch_size,), generator=g)], g)
            with torch.no_grad():
                t = teacher(x)
            per_sample = _kl(t, student(x), cfg.temperature, reduction="none").sum(1)
            if sv_on:  # fixed transfer set: SV anti-distils suspicious samples (the paper's rule)
                guard.observe(x, t)
                loss = guard.reweight(per_sample, guard.suspicious(x, t))
            else:
                loss = per_sample.mean()
            opt_s.zero_grad()
            loss.backward()
            opt_s.step()
            sched.step()
            track.tick(f"kd {loss.item():.3f}")
        rep = _report(guard)
    return DistillResult(student, rep, track.history, track.steps)
