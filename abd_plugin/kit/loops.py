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
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abd_plugin import ABDConfig, ABDGuard

from .models import get_model
from .registry import Registry

Progress = Optional[Callable[[int, int, str], None]]


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
    report: Optional[Dict[str, Any]] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    student_steps: int = 0


_LOOPS: Registry[Callable[..., DistillResult]] = Registry("distillation method", "abd_plugin.kit.loops.list_loops()")


def list_loops() -> List[str]:
    return _LOOPS.names()


def _kl(t_logits: Tensor, s_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean") -> Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1),
                    reduction=reduction, log_target=True) * (t * t)


def _guard(teacher: nn.Module, student: nn.Module, abd: Optional[ABDConfig], total_steps: int) -> Any:
    if abd is None:
        return nullcontext()
    return ABDGuard(teacher, student, config=abd.replace(total_steps=total_steps))


def _report(guard: Any) -> Optional[Dict[str, Any]]:
    return guard.report().as_dict() if isinstance(guard, ABDGuard) else None


def distill(method: str, teacher: nn.Module, student: nn.Module, *, img_shape: Tuple[int, int, int],
            num_classes: int, config: DistillConfig = DistillConfig(), abd: Optional[ABDConfig] = None,
            real_data: Optional[Tuple[Tensor, Tensor]] = None, progress: Progress = None,
            eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None, eval_every: int = 0) -> DistillResult:
    """Distill ``teacher`` into ``student`` with loop ``method``, defended by ``abd`` (None: vanilla).

    Args:
        img_shape: (C, H, W) of the teacher's input.
        real_data: (x, y) training images; needed by ``clean``, ignored by the data-free loops.
        eval_fn: called on the student every ``eval_every`` student steps (history for plots).
    """
    fn = _LOOPS.factory(method)
    torch.manual_seed(config.seed)
    teacher.eval()
    return fn(teacher, student, img_shape=img_shape, num_classes=num_classes, cfg=config, abd=abd,
              real_data=real_data, progress=progress, eval_fn=eval_fn, eval_every=eval_every)


class _Tracker:
    def __init__(self, student: nn.Module, total: int, progress: Progress, eval_fn: Any, every: int) -> None:
        self.student, self.total, self.progress, self.eval_fn, self.every = student, total, progress, eval_fn, every
        self.steps = 0
        self.history: List[Dict[str, float]] = []

    def tick(self, msg: str = "") -> None:
        self.steps += 1
        if self.progress:
            self.progress(self.steps, self.total, msg)
        if self.eval_fn and self.every and (self.steps % self.every == 0 or self.steps == self.total):
            was = self.student.training
            row = {"step": float(self.steps), **self.eval_fn(self.student)}
            self.student.train(was)
            self.history.append(row)


def _adversarial_loop(distance: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., DistillResult]:
    def loop(teacher: nn.Module, student: nn.Module, *, img_shape: Tuple[int, int, int], num_classes: int,
             cfg: DistillConfig, abd: Optional[ABDConfig], progress: Progress, eval_fn: Any, eval_every: int,
             **_: Any) -> DistillResult:
        c, h, w = img_shape
        generator = get_model("generator_zskt", in_channels=c, channels=c, z_dim=cfg.z_dim, img_size=h,
                              ngf=cfg.generator_width)
        total = cfg.iterations * cfg.n_student_steps
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_generator)
        opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_student)
        sch_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, cfg.iterations)
        sch_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, total)
        track = _Tracker(student, total, progress, eval_fn, eval_every)
        student.train()
        generator.train()
        guard = _guard(teacher, student, abd, total)
        with guard:
            for it in range(cfg.iterations):
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
def _clean(teacher: nn.Module, student: nn.Module, *, cfg: DistillConfig, real_data: Optional[Tuple[Tensor, Tensor]],
           abd: Optional[ABDConfig], progress: Progress, eval_fn: Any, eval_every: int, **_: Any) -> DistillResult:
    if real_data is None:
        raise ValueError("method 'clean' distills on real data: pass real_data=(x, y)")
    x_all = real_data[0]
    total = cfg.iterations * cfg.n_student_steps
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_student)
    sch_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, total)
    track = _Tracker(student, total, progress, eval_fn, eval_every)
    g = torch.Generator().manual_seed(cfg.seed)
    student.train()
    guard = _guard(teacher, student, abd, total)
    with guard:
        for _ in range(total):
            x = x_all[torch.randint(len(x_all), (cfg.batch_size,), generator=g)]
            with torch.no_grad():
                t = teacher(x)
            loss = _kl(t, student(x), cfg.temperature)
            opt_s.zero_grad()
            loss.backward()
            opt_s.step()
            sch_s.step()
            track.tick(f"loss {loss.item():.3f}")
        rep = _report(guard)
    return DistillResult(student, rep, track.history, track.steps)
