"""Shuffling Vaccine (SV): flag synthetic samples on which a channel-shuffled teacher still agrees
with the teacher, and push the synthesizer away from them.

Shape of the implementation
---------------------------
* **Ensemble.** ``n_shuffle_models`` (k) copies of the teacher whose chosen layers read their input
  channels in a random order. Permuting a conv's input-channel weights, ``W[:, perm]``, is the same
  as running the unchanged conv on the input with channels ``argsort(perm)``; so instead of k
  weight copies the vaccine keeps one frozen, hook-free replica of the teacher and a forward
  pre-hook per shuffled layer that permutes each member's chunk of a k-times repeated batch. The
  whole ensemble is one batched forward.
* **Shared trunk.** Layers before the first shuffled one compute the same thing for every member.
  A dry run finds the latest module M (before the first shuffled layer, called once per forward)
  at which the batch can be repeated without changing the result; later passes reuse M's input
  and run only the tail k times. Inside a guard the vaccine reads M's input from the teacher's own
  forward (a pre-hook it installs in ``on_guard_enter``) instead of recomputing it. The
  dry run checks the shared-trunk result against the full ensemble numerically, so models where a
  skip connection crosses M, or whose forward reads the input's batch size, fall back to full
  passes.
* **Layer order** comes from that dry run (forward execution order), never from parameter names.
* **Suspicion.** ``m_i = argmax ensemble_i == argmax teacher_i``;
  ``d_i = KL(p_T || p_ens)_i / C``; loss term ``R = -coef * sum_i m_i d_i / sum_i m_i``.
* **Verification** (on by default): pool ``verify_batches`` synthetic batches (detached, on CPU)
  after skipping ``verify_skip``; with ``s = log10 d`` the vaccine is accepted when
  ``mean(s < mean(s) - 3 std(s)) > 0.02``; otherwise the permutations are re-drawn, at most
  ``max_shuffle_trials`` shuffles in all, after which SV switches itself off and says so.
* **Automatic depth** (``shuffle_layers="auto"``): the candidates are the Conv *and* Linear layers
  in forward order; every depth 1..``auto_max_depth`` (counted from the output side) is scored on
  the verification pool by its tail ratio and the depth with the largest ratio wins (ties: the
  shallower). Rationale, measured: on a 5-conv CNN shuffling too few layers leaves every sample
  agreeing (no tail), too many destroys the trigger's shortcut as well (no tail); the separating
  depth is the one that makes the low-divergence tail stand out. On LeNet-5 no conv depth
  separates triggered from clean inputs at all (8-34 % vs 2-30 % agreement) while shuffling the
  inputs of the last Linear layer does (0.3-9 % vs 49-99 %); so Linear layers are candidates. A
  fixed depth (the paper's 5 of WRN-16-2's 16 convs) does not transfer across architectures.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._replica import TeacherReplica, unwrap_model
from .config import ABDConfig
from .hooks import DefenseHook
from .outputs import check_input, check_logits, extract_logits

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


def _dist_sum(values: Tensor) -> Tensor:
    """Sum over ranks when torch.distributed is running (same decision on every rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
               else values.device)  # NCCL reduces CUDA tensors only
        buf = values.to(dev, copy=True)
        dist.all_reduce(buf)
        values = buf.to(values.device)
    return values


def divergence_and_mask(teacher_logits: Tensor, ensemble_logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-sample ``KL(p_T || p_ens) / C`` and the suspicion mask ``argmax`` agreement."""
    log_p_t = F.log_softmax(teacher_logits, dim=1)
    log_p_e = F.log_softmax(ensemble_logits, dim=1)
    d = (log_p_t.exp() * (log_p_t - log_p_e)).mean(dim=1)
    mask = ensemble_logits.argmax(1) == teacher_logits.argmax(1)
    return d, mask


def tail_ratio(d: Tensor, sigma: float) -> float:
    """Fraction of samples with ``log10 d < mean - sigma * std`` (the paper's verification)."""
    s = torch.log10(d.double().clamp_min(1e-30))
    if s.numel() < 2:
        return 0.0
    thr = s.mean() - sigma * s.std()
    return float((s < thr).double().mean())


class ShufflingVaccine(DefenseHook):
    """The Shuffling Vaccine as a :class:`DefenseHook` that also works on its own.

    Standalone use::

        sv = ShufflingVaccine(teacher, ABDConfig(verify=False))
        t = teacher(x)                        # x from the generator, in the graph
        loss_g = my_generator_loss(...) + sv.penalty(x, t)

    Args:
        teacher: the (possibly poisoned) teacher; never modified.
        config: an :class:`ABDConfig` (SV fields are read).
        replica: share a :class:`~abd_plugin._replica.TeacherReplica` with other defenses.
    """

    name = "sv"

    def __init__(
        self,
        teacher: nn.Module,
        config: Optional[ABDConfig] = None,
        *,
        replica: Optional[TeacherReplica] = None,
    ) -> None:
        self.config = config or ABDConfig()
        self.teacher = teacher
        self._replica = replica or TeacherReplica(teacher)
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self.coef = float(self.config.sv_coef)
        # built lazily on the first batch
        self.built = False
        self.candidates: List[str] = []  # shufflable layer names, forward order
        self.layers: List[str] = []  # layers shuffled now
        self.depth = 0
        self.perms: Dict[str, Tensor] = {}  # name -> (k, C_in_group) permutations
        self.expansion: Optional[str] = None  # shared-trunk module name, None = full passes
        self._expansion_checked: Dict[str, Optional[str]] = {}  # layers-key -> expansion
        self._handles: List[Any] = []
        self._inv_cache: Dict[Tuple[str, str], Tensor] = {}
        self._active = False
        # verification
        self.status = "collecting" if self.config.verify else "enabled"
        self.trials: List[Dict[str, Any]] = []
        self.observed = 0
        self._pool_x: List[Tensor] = []
        self._pool_t: List[Tensor] = []
        # statistics
        self.calls = 0
        self.sum_suspicious = 0.0
        self.sum_samples = 0
        self.last_fraction = float("nan")
        self.last_penalty = 0.0
        self.seconds = 0.0
        self._pending_state: Optional[Dict[str, Any]] = None
        # inside a guard: the input of the trunk module from the teacher's current forward
        self._captured: Optional[Tuple[str, Tensor]] = None
        self._teacher_handles: List[Any] = []  # on the teacher while a guard is active
        self._trunk_handle: Any = None
        self._trunk_hooked: Optional[str] = None

    # ------------------------------------------------------------------ building
    @property
    def enabled(self) -> bool:
        return self.status == "enabled" and self.coef > 0

    def _dry_run(self, x: Tensor) -> Tuple[List[str], List[str], Dict[str, int], Tensor]:
        """Run the replica once recording module call order. Returns (all modules in pre-hook
        order, shufflable layers in order, call counts, logits)."""
        rep = self._replica.to_device_of(x)
        order: List[str] = []
        counts: Dict[str, int] = {}
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
                out = rep(x)
        finally:
            for h in handles:
                h.remove()
        logits = extract_logits(out, self.config.logits_fn)
        check_logits(logits, x.shape[0], "teacher logits")
        mods = dict(rep.named_modules())
        linear = self.config.shuffle_linear or isinstance(self.config.shuffle_layers, str)
        kinds = _CONV + ((nn.Linear,) if linear else ())
        shuf = [n for n in order if isinstance(mods[n], kinds) and _in_group_channels(mods[n]) >= 2]
        return order, shuf, counts, logits

    def build(self, x: Tensor) -> None:
        """Discover the layers (dry run on ``x[:2]``) and draw the first permutations."""
        if self.built:
            return
        check_input(x, "teacher input")
        probe = x[:2].detach()
        order, shuf, counts, _ = self._dry_run(probe)
        spec = self.config.shuffle_layers
        mods = dict(self._replica.module.named_modules())
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
        if self._pending_state is not None:
            self.built = True
            self._apply_state(self._pending_state)
            self._pending_state = None
            return
        if isinstance(spec, int):
            depth = min(spec, len(self.candidates))
        elif isinstance(spec, str):  # auto: provisional depth 1 until verification picks one
            depth = 1
        else:
            depth = len(self.candidates)
        self._set_layers(depth, self._draw_perms(self.candidates[-depth:]))
        self.built = True

    def _draw_perms(self, names: Sequence[str]) -> Dict[str, Tensor]:
        mods = dict(self._replica.module.named_modules())
        k = self.config.n_shuffle_models
        out = {}
        for n in names:
            c = _in_group_channels(mods[n])
            out[n] = torch.stack([torch.randperm(c, generator=self._gen) for _ in range(k)])
        return out

    def _set_layers(self, depth: int, perms: Dict[str, Tensor]) -> None:
        self.depth = depth
        self.layers = list(self.candidates[-depth:])
        self.perms = {n: perms[n] for n in self.layers}
        self._inv_cache = {}
        self._install()
        key = "|".join(self.layers)
        if key not in self._expansion_checked:
            self._expansion_checked[key] = self._find_expansion()
        self.expansion = self._expansion_checked[key]

    def _inverse(self, name: str, device: torch.device) -> Tensor:
        """argsort of the layer's permutations, computed once per permutation and device."""
        key = (name, str(device))
        inv = self._inv_cache.get(key)
        if inv is None:
            inv = torch.argsort(self.perms[name], dim=1).to(device)
            self._inv_cache[key] = inv
        return inv

    def _install(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        mods = dict(self._replica.module.named_modules())
        for n in self.layers:
            self._handles.append(mods[n].register_forward_pre_hook(self._make_shuffle_hook(n)))

    def _make_shuffle_hook(self, name: str):
        def hook(mod: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
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
                g = mod.groups
                cg = inv.shape[1]
                out = []
                for j, c in enumerate(chunks):
                    idx = (inv[j].unsqueeze(0) + cg * torch.arange(g, device=x.device).unsqueeze(1)).reshape(-1)
                    out.append(c.index_select(1, idx))
            return (torch.cat(out, 0),) + tuple(args[1:])

        return hook

    # ------------------------------------------------------------------ ensemble forward
    def _full(self, x: Tensor) -> Tensor:
        rep = self._replica.to_device_of(x)
        k = self.config.n_shuffle_models
        self._active = True
        try:
            out = rep(x.repeat(k, *([1] * (x.dim() - 1))))
        finally:
            self._active = False
        z = extract_logits(out, self.config.logits_fn)
        return z.view(k, x.shape[0], -1).mean(0)

    def _trunk(self, x: Tensor, at: str) -> Tensor:
        """Input of module ``at`` when the replica runs on ``x`` (the forward stops there)."""
        rep = self._replica.to_device_of(x)
        mod = dict(rep.named_modules())[at]

        def stop(_m: nn.Module, args: Tuple[Any, ...]) -> None:
            raise _StopForward(args[0])

        h = mod.register_forward_pre_hook(stop)
        try:
            rep(x)
        except _StopForward as s:
            return s.value
        finally:
            h.remove()
        raise RuntimeError(f"module {at} was not called in the forward pass")

    def _tail(self, x: Tensor, trunk: Tensor, at: str) -> Tensor:
        """Ensemble logits from the input ``trunk`` of module ``at`` (shared by all members)."""
        rep = self._replica.to_device_of(x)
        mod = dict(rep.named_modules())[at]
        k = self.config.n_shuffle_models
        expanded = trunk.repeat(k, *([1] * (trunk.dim() - 1)))

        def swap(_m: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
            return (expanded,) + tuple(args[1:])

        h = mod.register_forward_pre_hook(swap)
        self._active = True
        try:
            out = rep(x[:1])
        finally:
            self._active = False
            h.remove()
        z = extract_logits(out, self.config.logits_fn)
        return z.view(k, trunk.shape[0], -1).mean(0)

    def _find_expansion(self) -> Optional[str]:
        """Latest module before the first shuffled layer where the trunk can be shared."""
        order, counts, probe = self._order, self._counts, self._probe
        first = min(order.index(n) for n in self.layers)
        mods = dict(self._replica.module.named_modules())
        with torch.no_grad():
            ref = self._full(probe)
            tried = 0
            for name in reversed(order[:first]):
                if counts.get(name, 0) != 1 or any(name.startswith(s + ".") for s in self.layers):
                    continue
                # a container that holds a shuffled layer starts before it: still valid
                tried += 1
                if tried > 24:
                    break
                try:
                    trunk = self._trunk(probe, name)
                    if not isinstance(trunk, Tensor) or trunk.shape[0] != probe.shape[0]:
                        continue
                    got = self._tail(probe, trunk, name)
                except Exception:
                    continue
                if got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * (1 + ref.abs().max().item())):
                    del mods
                    return name
        return None

    def ensemble_logits(self, x: Tensor, trunk: Optional[Tensor] = None) -> Tensor:
        """Mean logits of the shuffled ensemble on ``x`` (B, ...) -> (B, C), differentiable in x."""
        if not self.built:
            self.build(x)
        if self.expansion is None:
            return self._full(x)
        if trunk is None:
            trunk = self._trunk(x, self.expansion)
        return self._tail(x, trunk, self.expansion)

    # ------------------------------------------------------------------ public API
    def suspicious(self, x: Tensor, teacher_logits: Tensor) -> Tensor:
        """Boolean mask (B,): the shuffled ensemble predicts the teacher's class."""
        check_input(x)
        check_logits(teacher_logits, x.shape[0], "teacher_logits")
        with torch.no_grad():
            z = self.ensemble_logits(x.detach())
            _, mask = divergence_and_mask(teacher_logits.detach(), z)
        self._record(mask)
        return mask

    def penalty(self, x: Tensor, teacher_logits: Tensor, *, trunk: Optional[Tensor] = None) -> Tensor:
        """The SV loss term for a synthesis batch: ``-coef * mean_{suspicious} d``.

        Args:
            x: the exact batch fed to the teacher (B, ...), in the synthesizer's graph.
            teacher_logits: the teacher's logits on ``x`` (B, C), in the graph.
            trunk: the input of the shared-trunk module (``self.expansion``) from the teacher's
                forward on ``x``; saves recomputing it. Ignored when this call builds or verifies
                the vaccine and so moves the shared trunk.
        Returns a scalar; 0 (no graph) while the vaccine is unverified or disabled.
        """
        check_input(x)
        check_logits(teacher_logits, x.shape[0], "teacher_logits")
        t0 = time.perf_counter()
        try:
            shared_at = self.expansion
            if not self.built:
                self.build(x)
            if self.status == "collecting":
                self.observe(x, teacher_logits)
            if not self.enabled:
                return teacher_logits.new_zeros(())
            if self.expansion != shared_at:
                trunk = None  # built or verified just now: ``trunk`` is another module's input
            z = self.ensemble_logits(x, trunk)
            if not self.config.sv_grad_through_ensemble:
                z = z.detach()
            d, mask = divergence_and_mask(teacher_logits, z)
            self._record(mask)
            n = mask.sum()
            if int(n) == 0:
                pen = (d * 0).sum()
            else:
                pen = -self.coef * (d * mask).sum() / n
            self.last_penalty = float(pen.detach())
            self._adapt(mask)
            return pen
        finally:
            self.seconds += time.perf_counter() - t0

    def reweight(self, per_sample_loss: Tensor, mask: Tensor) -> Tensor:
        """Fixed-transfer-set rule: ``mean(kept) - coef * mean(suspicious)``.

        Finite when no sample or every sample is suspicious (the empty mean counts as 0)."""
        if per_sample_loss.dim() != 1 or mask.shape != per_sample_loss.shape:
            raise ValueError(
                "reweight needs a per-sample loss of shape (B,) and a mask of the same shape; "
                "use reduction='none' and sum over classes first"
            )
        mask = mask.to(torch.bool)
        keep = ~mask
        zero = per_sample_loss.sum() * 0
        kept = per_sample_loss[keep].mean() if keep.any() else zero
        coef = self.coef if self.status == "enabled" else 0.0
        susp = per_sample_loss[mask].mean() if mask.any() and coef > 0 else zero
        return kept - coef * susp

    def observe(self, x: Tensor, teacher_logits: Tensor) -> None:
        """Add a synthetic batch to the verification pool (detached, CPU); runs the test once
        ``verify_batches`` batches are pooled."""
        if self.status != "collecting":
            return
        self.observed += 1
        if self.observed <= self.config.verify_skip:
            return
        self._pool_x.append(x.detach().to("cpu", copy=True))
        self._pool_t.append(teacher_logits.detach().to("cpu", copy=True).float())
        if len(self._pool_x) >= self.config.verify_batches:
            if not self.built:
                self.build(x)
            self.verify()

    def _pool_divergence(self) -> Tuple[Tensor, Tensor]:
        dev = self._probe.device
        ds, ms = [], []
        with torch.no_grad():
            for xb, tb in zip(self._pool_x, self._pool_t):
                z = self.ensemble_logits(xb.to(dev)).float().cpu()
                d, m = divergence_and_mask(tb, z)
                ds.append(d)
                ms.append(m)
        return torch.cat(ds), torch.cat(ms)

    def _score(self) -> Tuple[float, float, int]:
        d, m = self._pool_divergence()
        s = torch.log10(d.double().clamp_min(1e-30))
        # pooled over ranks (mean/std first, then the counts): every rank takes the same decision
        mom = _dist_sum(torch.stack([s.sum(), s.pow(2).sum(), torch.tensor(float(s.numel()), dtype=torch.float64)]))
        n = float(mom[2])
        mean = float(mom[0]) / n
        var = max(float(mom[1]) / n - mean * mean, 0.0) * n / max(n - 1, 1.0)
        thr = mean - self.config.tail_sigma * var ** 0.5
        cnt = _dist_sum(torch.tensor([float((s < thr).sum()), float(m.sum())], dtype=torch.float64))
        return float(cnt[0]) / n, float(cnt[1]) / n, int(n)

    def verify(self) -> str:
        """Run the tail-ratio test on the pool (choosing the depth when ``shuffle_layers='auto'``);
        returns the new status ``"enabled"`` or ``"disabled"``."""
        cfg = self.config
        t0 = time.perf_counter()
        if isinstance(cfg.shuffle_layers, str):  # auto: score every depth once
            best: Optional[Tuple[float, int, Dict[str, Tensor]]] = None
            for depth in range(1, min(cfg.auto_max_depth, len(self.candidates)) + 1):
                perms = self._draw_perms(self.candidates[-depth:])
                self._set_layers(depth, perms)
                ratio, agree, n = self._score()
                self.trials.append({"depth": depth, "tail_ratio": ratio, "agreement": agree, "n": n})
                if best is None or ratio > best[0]:
                    best = (ratio, depth, perms)
            assert best is not None
            self._set_layers(best[1], best[2])
            accepted = best[0] > cfg.tail_ratio_threshold
            remaining = cfg.max_shuffle_trials - 1
        else:
            ratio, agree, n = self._score()
            self.trials.append({"depth": self.depth, "tail_ratio": ratio, "agreement": agree, "n": n})
            accepted = ratio > cfg.tail_ratio_threshold
            remaining = cfg.max_shuffle_trials - 1
        while not accepted and remaining > 0:
            remaining -= 1
            self._set_layers(self.depth, self._draw_perms(self.layers))
            ratio, agree, n = self._score()
            self.trials.append({"depth": self.depth, "tail_ratio": ratio, "agreement": agree, "n": n})
            accepted = ratio > cfg.tail_ratio_threshold
        self.status = "enabled" if accepted else "disabled"
        self._pool_x, self._pool_t = [], []
        self.seconds += time.perf_counter() - t0
        return self.status

    @property
    def message(self) -> str:
        if self.status == "collecting":
            return (f"SV: verifying ({len(self._pool_x)}/{self.config.verify_batches} batches "
                    "pooled)")
        if self.status == "enabled":
            return f"SV: on, {self.depth} shuffled layer(s) {self.layers}, coef {self.coef:.3g}"
        best = max((t["tail_ratio"] for t in self.trials), default=float("nan"))
        return (f"SV: no vaccine found after {len(self.trials)} shuffle(s) (best tail ratio "
                f"{best:.4f} <= {self.config.tail_ratio_threshold}) - SV is off; SR is still "
                "available")

    # ------------------------------------------------------------------ adaptation / stats
    def _record(self, mask: Tensor) -> None:
        self.calls += 1
        n = int(mask.numel())
        s = float(mask.sum())
        self.sum_suspicious += s
        self.sum_samples += n
        self.last_fraction = s / max(n, 1)

    def _adapt(self, mask: Tensor) -> None:
        cfg = self.config
        if not cfg.sv_adaptive:
            return
        counts = _dist_sum(torch.tensor([float(mask.sum()), float(mask.numel())], dtype=torch.float64))
        frac = float(counts[0] / counts[1])  # the same on every rank: coefficients stay in sync
        lo, hi = cfg.sv_coef_bounds
        self.coef = float(min(hi, max(lo, self.coef * math.exp(cfg.sv_adapt_rate * (frac - cfg.sv_target_fraction) / cfg.sv_target_fraction))))

    # ------------------------------------------------------------------ DefenseHook
    def on_guard_enter(self, guard: Any) -> None:
        # registered after the guard's own teacher hook: runs after it, also on an exception
        core = unwrap_model(self.teacher)
        self._teacher_handles = [core.register_forward_hook(self._end_forward, always_call=True)]
        self._hook_trunk()

    def on_guard_exit(self, guard: Any) -> None:
        for h in self._teacher_handles:
            h.remove()
        self._teacher_handles = []
        if self._trunk_handle is not None:
            self._trunk_handle.remove()
        self._trunk_handle = None
        self._trunk_hooked = None
        self._captured = None

    def on_teacher_forward(self, guard: Any, x: Tensor, teacher_logits: Tensor) -> Optional[Tensor]:
        captured, self._captured = self._captured, None
        trunk = captured[1] if captured is not None and captured[0] == self.expansion else None
        pen = self.penalty(x, teacher_logits, trunk=trunk)
        return pen if pen.requires_grad else None

    def _end_forward(self, _m: nn.Module, _args: Any, _out: Any) -> None:
        """After every teacher forward: drop its trunk, and follow a trunk module that moved."""
        self._captured = None
        self._hook_trunk()

    def _hook_trunk(self) -> None:
        """Keep one pre-hook on the teacher's shared-trunk module (``self.expansion``) that
        hands its input, from the teacher's own forward, to :meth:`on_teacher_forward`."""
        name = self.expansion if self.built else None
        if not self._teacher_handles or name == self._trunk_hooked:
            return
        if self._trunk_handle is not None:
            self._trunk_handle.remove()
            self._trunk_handle = None
        self._trunk_hooked = name
        if name is None:
            return
        core = unwrap_model(self.teacher)

        def capture(_m: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled() and not core.training and args and isinstance(args[0], Tensor):
                self._captured = (name, args[0])

        self._trunk_handle = dict(core.named_modules())[name].register_forward_pre_hook(capture)

    def report(self) -> Dict[str, Any]:
        return {
            "sv_status": self.status,
            "sv_message": self.message,
            "sv_coef": self.coef,
            "shuffle_depth": self.depth,
            "shuffled_layers": list(self.layers),
            "shared_trunk_at": self.expansion,
            "verification_trials": list(self.trials),
            "suspicious_fraction": self.sum_suspicious / self.sum_samples if self.sum_samples else float("nan"),
            "last_suspicious_fraction": self.last_fraction,
            "last_penalty": self.last_penalty,
            "sv_calls": self.calls,
            "sv_seconds": self.seconds,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {
            "built": self.built,
            "layers": list(self.layers),
            "depth": self.depth,
            "perms": {k: v.clone() for k, v in self.perms.items()},
            "status": self.status,
            "coef": self.coef,
            "trials": list(self.trials),
            "observed": self.observed,
            "pool_x": [t.clone() for t in self._pool_x],
            "pool_t": [t.clone() for t in self._pool_t],
            "rng": self._gen.get_state(),
            "stats": (self.calls, self.sum_suspicious, self.sum_samples, self.last_fraction,
                      self.last_penalty, self.seconds),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state.get("built"):
            self._apply_counters(state)
            return
        if self.built:
            self._apply_state(state)
        else:
            self._pending_state = state
            self._apply_counters(state)

    def _apply_counters(self, state: Dict[str, Any]) -> None:
        self.status = state["status"]
        self.coef = float(state["coef"])
        self.trials = list(state["trials"])
        self.observed = int(state["observed"])
        self._pool_x = [t.clone() for t in state["pool_x"]]
        self._pool_t = [t.clone() for t in state["pool_t"]]
        self._gen.set_state(state["rng"])
        (self.calls, self.sum_suspicious, self.sum_samples, self.last_fraction,
         self.last_penalty, self.seconds) = state["stats"]

    def _apply_state(self, state: Dict[str, Any]) -> None:
        missing = [n for n in state["layers"] if n not in self.candidates]
        if missing:
            raise ValueError(
                f"vaccine state names layers {missing} that this teacher does not have; was it "
                "saved with another architecture?"
            )
        self._set_layers(int(state["depth"]), {k: v.clone() for k, v in state["perms"].items()})
        self._apply_counters(state)
