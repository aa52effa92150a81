"""A minimal ZSKT loop (Micaelli & Storkey 2019, as run by the ABD paper) for timing.

Per pseudo batch (one "iteration"): ``n_generator_iter`` generator steps on a fresh z, one
no-grad teacher forward, then ``n_student_iter`` student steps on the same detached batch
(ZSKT defaults 1 and 10; Adam 1e-3 / 2e-3; gradient clipping at 5; KL temperature 1).
The attention-transfer term is left out (the kit's models return logits only); the generator
ends with ZSKT's affine-free BatchNorm (``out="bn"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kl_teacher_student(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """ZSKT's ``KL(p_T || p_S)`` (``reduction='batchmean'``)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean")


class ZSKTLoop:
    """Holds the three models and their optimizers; each method is one timed unit.

    Args:
        teacher: frozen, eval-mode teacher (``requires_grad_(False)``: the generator step then
            back-propagates to the input only, which makes any defense's relative cost larger).
        student, generator: trained, train mode.
        batch: pseudo-batch size B.
        n_student_iter: student steps per pseudo batch (ZSKT: 10).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, generator: nn.Module, batch: int, *,
                 n_student_iter: int = 10, seed: int = 0) -> None:
        self.teacher, self.student, self.generator = teacher, student, generator
        self.batch = batch
        self.n_student_iter = n_student_iter
        self.device = next(student.parameters()).device
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
        self.opt_s = torch.optim.Adam(student.parameters(), lr=2e-3)
        self._rng = torch.Generator(device="cpu").manual_seed(seed)
        self.z = self._new_z()
        self.x: Tensor | None = None

    def _new_z(self) -> Tensor:
        return torch.randn(self.batch, self.generator.z_dim, generator=self._rng).to(self.device)

    def generator_step(self, extra_loss: object | None = None) -> Tensor:
        """One generator step: maximise ``KL(p_T || p_S)`` on ``G(z)``. ``extra_loss(t_logits, x)``
        (the official SV) is added to the generator loss when given."""
        x = self.generator(self.z)
        t = self.teacher(x)
        s = self.student(x)
        loss = -kl_teacher_student(s, t)
        if extra_loss is not None:
            loss = loss + extra_loss(t, x)  # type: ignore[operator]
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.generator.parameters(), 5.0)
        self.opt_g.step()
        self.x = x.detach()
        return loss.detach()

    def student_step(self, x: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
        """One student step on ``x``; the teacher's logits are computed (no grad) when not given."""
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        loss = kl_teacher_student(self.student(x), teacher_logits)
        self.opt_s.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.student.parameters(), 5.0)
        self.opt_s.step()
        return loss.detach()

    def iteration(self) -> None:
        """One ZSKT pseudo batch: 1 generator step, 1 teacher forward, ``n_student_iter`` student
        steps."""
        self.z = self._new_z()
        self.generator_step()
        assert self.x is not None
        with torch.no_grad():
            t = self.teacher(self.x)
        for _ in range(self.n_student_iter):
            self.student_step(self.x, t)
