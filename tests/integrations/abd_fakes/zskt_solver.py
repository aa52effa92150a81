"""Fake ``solver.py`` of ZSKT (hosts.md section 6): G-step then S-steps on one pseudo batch."""
import types

import torch
import torch.nn.functional as F

from .common import TinyGenerator, TinyNet, trace


def make_args(**kw):
    base = dict(total_n_pseudo_batches=3, n_generator_iter=1, n_student_iter=2, batch_size=4,
                z_dim=8, KL_temperature=1.0, AT_beta=0.0)
    base.update(kw)
    return types.SimpleNamespace(**base)


class LearnableLoader(torch.nn.Module):
    def __init__(self, args, n_repeat_batch):
        super().__init__()
        self.args, self.n_repeat_batch, self.calls = args, n_repeat_batch, 0
        self.generator = TinyGenerator(nz=args.z_dim)
        self.z = torch.randn(args.batch_size, args.z_dim)

    def __next__(self):
        if self.calls % self.n_repeat_batch == 0:
            self.z = torch.randn(self.args.batch_size, self.args.z_dim)
        self.calls += 1
        return self.generator(self.z)


class ZeroShotKTSolver:
    def __init__(self, args):
        self.args = args
        self.teacher = TinyNet(tuple_out=True)
        self.student = TinyNet(tuple_out=True)
        self.teacher.eval()
        self.student.train()
        self.n_repeat_batch = args.n_generator_iter + args.n_student_iter
        self.generator = LearnableLoader(args, self.n_repeat_batch)
        self.optimizer_generator = torch.optim.Adam(self.generator.parameters(), lr=1e-3)
        self.optimizer_student = torch.optim.Adam(self.student.parameters(), lr=2e-3)
        self.n_pseudo_batches = 0

    def run(self):
        idx_pseudo = 0
        while self.n_pseudo_batches < self.args.total_n_pseudo_batches:
            x_pseudo = self.generator.__next__()
            if idx_pseudo % self.n_repeat_batch < self.args.n_generator_iter:
                student_logits, *student_activations = self.student(x_pseudo)
                teacher_logits, *teacher_activations = self.teacher(x_pseudo)
                generator_total_loss = self.KT_loss_generator(student_logits, teacher_logits)
                self.optimizer_generator.zero_grad()
                trace("loss:G", generator_total_loss)
                generator_total_loss.backward()
                trace("backward:G")
                torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 5)
                self.optimizer_generator.step()
            elif idx_pseudo % self.n_repeat_batch < self.n_repeat_batch:
                if idx_pseudo % self.n_repeat_batch == self.args.n_generator_iter:
                    with torch.no_grad():
                        teacher_logits, *teacher_activations = self.teacher(x_pseudo)
                student_logits, *student_activations = self.student(x_pseudo)
                student_total_loss = self.KT_loss_student(student_logits, student_activations,
                                                          teacher_logits, teacher_activations)
                self.optimizer_student.zero_grad()
                trace("loss:S", student_total_loss)
                student_total_loss.backward()
                trace("backward:S")
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), 5)
                self.optimizer_student.step()
            if (idx_pseudo + 1) % self.n_repeat_batch == 0:
                self.n_pseudo_batches += 1
            idx_pseudo += 1

    def divergence(self, student_logits, teacher_logits):
        t = self.args.KL_temperature
        return F.kl_div(
            F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1)
        )

    def KT_loss_generator(self, student_logits, teacher_logits):
        return -self.divergence(student_logits, teacher_logits)

    def KT_loss_student(
        self, student_logits, student_activations, teacher_logits, teacher_activations
    ):
        return self.divergence(student_logits, teacher_logits)
