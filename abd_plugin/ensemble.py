"""The shuffled ensemble behind the Shuffling Vaccine: k copies of the teacher whose chosen layers
read their input channels in a random order, run as one batched forward.

* **One replica, input permutations.** Permuting a conv's input-channel weights, ``W[:, perm]``,
  is the same as running the unchanged conv on the input with channels ``argsort(perm)``; so
  instead of k weight copies the ensemble keeps one frozen, hook-free replica of the teacher and a
  forward pre-hook per shuffled layer that permutes each member's chunk of a k-times repeated
  batch. The whole ensemble is one batched forward.
* **Layer order** comes from a dry run (forward execution order), never from parameter names.
  The candidates are the Conv layers (and the Linear layers, with ``shuffle_linear`` or
  ``shuffle_layers="auto"``) with at least two input channels per group.
* **Shared trunk.** Layers before the first shuffled one compute the same thing for every member.
  The dry run finds the latest module (the *trunk module*: before the first shuffled layer, called
  once per forward) at which the batch can be repeated without changing the result; later passes
  take that module's input (the *trunk*) and run only the tail k times. The search checks the
  shared-trunk result against the full ensemble numerically, so models where a skip connection
  crosses the module, or whose forward reads the input's batch size, fall back to full passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._amp import as_input_of
from ._replica import TeacherReplica
from .outputs import check_logits, extract_logits

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _StopForward(Exception):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


def _in_group_channels(mod: nn.Module) -> int:
    if isinstance(mod, _CONV):
        return mod.in_channels // mod.groups
    if isinstance(mod, nn.Linear):
        return mod.in_features
    raise TypeError(f"cannot shuffle a {type(mod).__name__}")


class ShuffledEnsemble:
    """``n_models`` channel-shuffled copies of a teacher, averaged.

    Call :meth:`discover` once on a batch, then :meth:`set_layers` with permutations from
    :meth:`draw`; :meth:`logits` gives the ensemble's mean logits (differentiable in ``x``).

    Args:
        replica: the frozen, hook-free teacher copy the ensemble runs.
        n_models: shuffled copies averaged.
        layers: which layers are shuffled: ``"auto"`` (the verification chooses the depth; Conv
            and Linear layers are candidates), an int k (the last k conv layers in forward
            order), or a list of module names.
        shuffle_linear: also count ``nn.Linear`` layers as candidates for an int ``layers``.
        seed: seed of the permutations' own RNG.
        logits_fn: how to find the logits in the teacher's output.
    """

    def __init__(self, replica: TeacherReplica, *, n_models: int = 3,
                 layers: str | int | Sequence[str] = "auto", shuffle_linear: bool = False,
                 seed: int = 0, logits_fn: Callable[[Any], Tensor] | None = None) -> None:
        self.replica = replica
        self.n_models = int(n_models)
        self.layer_spec = layers
        self.shuffle_linear = bool(shuffle_linear)
        self.logits_fn = logits_fn
        self.generator = torch.Generator().manual_seed(seed)  # permutations only
        self.candidates: list[str] = []  # shufflable layer names, forward order
        self.layers: list[str] = []  # layers shuffled now
        self.depth = 0
        self.perms: dict[str, Tensor] = {}  # name -> (k, C_in_group) permutations
        self.trunk_module: str | None = None  # None: full passes
        self._trunk_modules: dict[str, str | None] = {}  # layers -> trunk module, searched once
        self._handles: list[Any] = []
        self._inv_cache: dict[tuple[str, str], Tensor] = {}
        self._active = False
        self._order: list[str] = []
        self._counts: dict[str, int] = {}
        self._probe: Tensor | None = None
        self.num_classes: int | None = None  # the teacher's, from the dry run

    # ------------------------------------------------------------------ discovery
    def _dry_run(self, x: Tensor) -> tuple[list[str], list[str], dict[str, int]]:
        """Run the replica once recording module call order. Returns (all modules in pre-hook
        order, shufflable layers in order, call counts)."""
        rep = self.replica.to_device_of(x)
        order: list[str] = []
        counts: dict[str, int] = {}
        handles = []
        for name, mod in rep.named_modules():
            if name == "":
                continue

            def pre(_m: nn.Module, _a: Any, _n: str = name) -> None:
                counts[_n] = counts.get(_n, 0) + 1
                if counts[_n] == 1:
                    order.append(_n)

            handles.append(mod.register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                out = rep(as_input_of(rep, x))
        finally:
            for h in handles:
                h.remove()
        logits = extract_logits(out, self.logits_fn)
        check_logits(logits, x.shape[0], "teacher logits")
        self.num_classes = int(logits.shape[1])
        mods = dict(rep.named_modules())
        linear = self.shuffle_linear or isinstance(self.layer_spec, str)
        kinds = _CONV + ((nn.Linear,) if linear else ())
        shuf = [n for n in order
                if isinstance(mods[n], kinds) and _in_group_channels(mods[n]) >= 2]
        return order, shuf, counts

    def discover(self, probe: Tensor) -> None:
        """Find the candidate layers (``layers``) by a dry run on ``probe``."""
        order, shuf, counts = self._dry_run(probe)
        spec = self.layer_spec
        mods = dict(self.replica.module.named_modules())
        if isinstance(spec, (list, tuple)):
            missing = [n for n in spec if n not in mods]
            if missing:
                raise ValueError(
                    f"shuffle_layers names {missing} are not modules of the teacher; valid conv "
                    f"layers in forward order: {shuf}"
                )
            bad = [n for n in spec if not isinstance(mods[n], _CONV + (nn.Linear,))]
            if bad:
                raise ValueError(f"shuffle_layers {bad} are not Conv/Linear layers")
            self.candidates = [n for n in order if n in spec]
        else:
            if not shuf:
                raise ValueError(
                    "teacher has no Conv layer with >= 2 input channels to shuffle; pass "
                    "shuffle_layers=[...module names...] or shuffle_linear=True (or "
                    "shuffle_layers='auto', which also tries Linear layers)"
                )
            self.candidates = shuf
        self._order = order
        self._counts = counts
        self._probe = probe

    @property
    def device(self) -> torch.device:
        """Device of the batch the ensemble was discovered on."""
        assert self._probe is not None, "discover() first"
        return self._probe.device

    def initial_depth(self) -> int:
        """Depth before verification: ``layers`` as an int (capped), every listed layer,
        or 1 for ``"auto"`` (verification picks the depth)."""
        spec = self.layer_spec
        if isinstance(spec, int):
            return min(spec, len(self.candidates))
        if isinstance(spec, str):
            return 1
        return len(self.candidates)

    # ------------------------------------------------------------------ permutations
    def draw(self, names: Sequence[str]) -> dict[str, Tensor]:
        """``n_models`` fresh permutations of each layer's input channels (per group)."""
        mods = dict(self.replica.module.named_modules())
        k = self.n_models
        out = {}
        for n in names:
            c = _in_group_channels(mods[n])
            out[n] = torch.stack([torch.randperm(c, generator=self.generator) for _ in range(k)])
        return out

    def set_layers(self, depth: int, perms: dict[str, Tensor]) -> None:
        """Shuffle the last ``depth`` candidates with ``perms``; find the trunk module (once per
        set of layers)."""
        self.depth = depth
        self.layers = list(self.candidates[-depth:])
        self.perms = {n: perms[n] for n in self.layers}
        self._inv_cache = {}
        self._install()
        key = "|".join(self.layers)
        if key not in self._trunk_modules:
            self._trunk_modules[key] = self._find_trunk_module()
        self.trunk_module = self._trunk_modules[key]

    def _inverse(self, name: str, device: torch.device) -> Tensor:
        """argsort of the layer's permutations, computed once per permutation and device."""
        key = (name, str(device))
        inv = self._inv_cache.get(key)
        if inv is None:
            inv = torch.argsort(self.perms[name], dim=1).to(device)
            self._inv_cache[key] = inv
        return inv

    def remove(self) -> None:
        """Take the ensemble's shuffle hooks off the teacher copy (set_layers puts them back)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _install(self) -> None:
        self.remove()
        mods = dict(self.replica.module.named_modules())
        for n in self.layers:
            self._handles.append(mods[n].register_forward_pre_hook(self._shuffle_hook(n)))

    def _shuffle_hook(self, name: str) -> Callable[..., tuple[Any, ...] | None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self._active:
                return None
            x = args[0]
            inv = self._inverse(name, x.device)  # (k, Cg)
            k = inv.shape[0]
            if x.shape[0] % k:
                raise RuntimeError("shuffled ensemble got a batch not divisible by its size")
            chunks = x.chunk(k, dim=0)
            if isinstance(mod, nn.Linear):
                out = [c.index_select(-1, inv[j]) for j, c in enumerate(chunks)]
            else:
                assert isinstance(mod, _CONV)
                g = mod.groups
                cg = inv.shape[1]
                groups = cg * torch.arange(g, device=x.device).unsqueeze(1)
                out = []
                for j, c in enumerate(chunks):
                    idx = (inv[j].unsqueeze(0) + groups).reshape(-1)
                    out.append(c.index_select(1, idx))
            return (torch.cat(out, 0),) + tuple(args[1:])

        return hook

    # ------------------------------------------------------------------ forward
    def logits(self, x: Tensor, trunk: Tensor | None = None) -> Tensor:
        """Mean logits of the ensemble on ``x`` (B, ...) -> (B, C), differentiable in ``x``.
        ``trunk``: the input of :attr:`trunk_module` on ``x`` if already at hand."""
        if self.trunk_module is None:
            return self.full(x)
        if trunk is None:
            trunk = self.trunk_input(x, self.trunk_module)
        return self.tail(x, trunk, self.trunk_module)

    def full(self, x: Tensor) -> Tensor:
        """The ensemble without a shared trunk: every member runs the whole replica."""
        rep = self.replica.to_device_of(x)
        k = self.n_models
        self._active = True
        try:
            out = rep(as_input_of(rep, x).repeat(k, *([1] * (x.dim() - 1))))
        finally:
            self._active = False
        z = extract_logits(out, self.logits_fn)
        return z.view(k, x.shape[0], -1).mean(0)

    def trunk_input(self, x: Tensor, at: str) -> Tensor:
        """Input of module ``at`` when the replica runs on ``x`` (the forward stops there)."""
        rep = self.replica.to_device_of(x)
        mod = dict(rep.named_modules())[at]

        def stop(_m: nn.Module, args: tuple[Any, ...]) -> None:
            raise _StopForward(args[0])

        h = mod.register_forward_pre_hook(stop)
        try:
            rep(as_input_of(rep, x))
        except _StopForward as s:
            return s.value
        finally:
            h.remove()
        raise RuntimeError(f"module {at} was not called in the forward pass")

    def tail(self, x: Tensor, trunk: Tensor, at: str) -> Tensor:
        """Ensemble logits from the input ``trunk`` of module ``at`` (shared by all members)."""
        rep = self.replica.to_device_of(x)
        mod = dict(rep.named_modules())[at]
        k = self.n_models
        expanded = trunk.repeat(k, *([1] * (trunk.dim() - 1)))

        def swap(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (expanded,) + tuple(args[1:])

        h = mod.register_forward_pre_hook(swap)
        self._active = True
        try:
            out = rep(as_input_of(rep, x[:1]))
        finally:
            self._active = False
            h.remove()
        z = extract_logits(out, self.logits_fn)
        return z.view(k, trunk.shape[0], -1).mean(0)

    def _find_trunk_module(self) -> str | None:
        """Latest module before the first shuffled layer where the trunk can be shared."""
        order, counts, probe = self._order, self._counts, self._probe
        assert probe is not None, "discover() first"
        first = min(order.index(n) for n in self.layers)
        with torch.no_grad():
            ref = self.full(probe)
            tol = 1e-5 * (1 + ref.abs().max().item())
            tried = 0
            for name in reversed(order[:first]):
                if counts.get(name, 0) != 1 or any(name.startswith(s + ".") for s in self.layers):
                    continue
                # a container that holds a shuffled layer starts before it: still valid
                tried += 1
                if tried > 24:
                    break
                try:
                    trunk = self.trunk_input(probe, name)
                    if not isinstance(trunk, Tensor) or trunk.shape[0] != probe.shape[0]:
                        continue
                    got = self.tail(probe, trunk, name)
                except Exception:
                    continue
                if got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4, atol=tol):
                    return name
        return None


class TrunkTap:
    """Reads the trunk (the input of ``ensemble.trunk_module``) from the teacher's own forward, so
    that the ensemble need not recompute it. :meth:`attach` installs a pre-hook on that module of
    the teacher and a forward hook on the teacher that drops the trunk after every forward (and
    follows a trunk module that verification moved); :meth:`detach` removes both."""

    def __init__(self, ensemble: ShuffledEnsemble) -> None:
        self.ensemble = ensemble
        self._teacher: nn.Module | None = None
        self._handle: Any = None  # the forward hook on the teacher
        self._pre: Any = None  # the pre-hook on the trunk module
        self._hooked: str | None = None
        self._trunk: tuple[str, Tensor] | None = None

    def attach(self, teacher: nn.Module) -> None:
        """Tap ``teacher`` (unwrapped). Attach after any forward hook that calls :meth:`take`:
        the teacher's forward hooks run in the order they were registered."""
        self._teacher = teacher
        self._handle = teacher.register_forward_hook(self._end_forward, always_call=True)
        self._follow()

    def detach(self) -> None:
        for h in (self._handle, self._pre):
            if h is not None:
                h.remove()
        self._teacher = self._handle = self._pre = self._hooked = self._trunk = None

    def take(self) -> Tensor | None:
        """The trunk of the teacher's current forward, if it is the input of the ensemble's
        current trunk module (else None); the tap forgets it."""
        got, self._trunk = self._trunk, None
        return got[1] if got is not None and got[0] == self.ensemble.trunk_module else None

    def _end_forward(self, _m: nn.Module, _args: Any, _out: Any) -> None:
        self._trunk = None
        self._follow()

    def _follow(self) -> None:
        name, teacher = self.ensemble.trunk_module, self._teacher
        if teacher is None or name == self._hooked:
            return
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        self._hooked = name
        if name is None:
            return

        def capture(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if (torch.is_grad_enabled() and not teacher.training and args
                    and isinstance(args[0], Tensor)):
                self._trunk = (name, args[0])

        self._pre = dict(teacher.named_modules())[name].register_forward_pre_hook(capture)
