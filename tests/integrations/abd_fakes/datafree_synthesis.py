"""Fake ``datafree.synthesis`` (Fast-Datafree flavour): call order of hosts.md section 4."""
import time

import torch
import torch.nn.functional as F

from .common import trace


class BaseSynthesis:
    def __init__(self, teacher, student):
        self.teacher = teacher
        self.student = student


def _kl(s, t):
    return F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")


class CMISynthesizer(BaseSynthesis):
    def __init__(self, teacher, student, generator, nz, num_classes, img_size, iterations=2,
                 synthesis_batch_size=4, adv=0.5, bn=1, oh=1, cr=0.8, device="cpu"):
        super().__init__(teacher, student)
        self.generator, self.nz, self.num_classes = generator, nz, num_classes
        self.iterations, self.bs, self.adv, self.oh, self.cr = (
            iterations,
            synthesis_batch_size,
            adv,
            oh,
            cr,
        )
        self.head = torch.nn.Linear(6, 4)
        self.optimizer_head = torch.optim.Adam(self.head.parameters(), 1e-3)
        self.feat = None
        teacher.bn1.register_forward_hook(lambda m, i, o: setattr(self, "feat", o.mean((2, 3))))
        self.data = None

    def synthesize(self, targets=None):
        self.student.eval()
        self.teacher.eval()
        z = torch.randn(self.bs, self.nz, requires_grad=True)
        targets = torch.arange(self.bs) % self.num_classes
        optimizer = torch.optim.Adam(
            [{"params": self.generator.parameters()}, {"params": [z]}], 1e-3
        )
        for _ in range(self.iterations):
            inputs = self.generator(z)
            global_view, local_view = inputs, inputs.flip(3)
            t_out = self.teacher(global_view)
            loss_oh = F.cross_entropy(t_out, targets)
            s_out = self.student(global_view)
            loss_inv = self.oh * loss_oh - self.adv * _kl(s_out, t_out)
            global_feature = self.feat
            _ = self.teacher(local_view)
            loss_cr = (self.head(self.feat) - self.head(global_feature).detach()).pow(2).mean()
            loss = self.cr * loss_cr + loss_inv
            optimizer.zero_grad()
            self.optimizer_head.zero_grad()
            trace("loss:G", loss)
            loss.backward()
            trace("backward:G")
            optimizer.step()
            self.optimizer_head.step()
        self.student.train()
        self.data = inputs.detach()
        return {"synthetic": self.data}, 0.0

    def sample(self):
        return self.data


class GenerativeSynthesizer(BaseSynthesis):
    def __init__(self, teacher, student, generator, nz, img_size, iterations=1,
                 synthesis_batch_size=4, sample_batch_size=4, adv=1.0, device="cpu"):
        super().__init__(teacher, student)
        self.generator, self.nz, self.iterations, self.bs, self.adv = (
            generator,
            nz,
            iterations,
            synthesis_batch_size,
            adv,
        )
        self.optimizer = torch.optim.Adam(generator.parameters(), 1e-3)

    def synthesize(self):
        start = time.time()
        self.student.eval()
        self.teacher.eval()
        for _ in range(self.iterations):
            self.optimizer.zero_grad()
            inputs = self.generator(torch.randn(self.bs, self.nz))
            t_out, t_feat = self.teacher(inputs, return_features=True)
            s_out = self.student(inputs)
            loss = -self.adv * _kl(s_out, t_out) - t_feat.abs().mean()
            trace("loss:G", loss)
            loss.backward()
            trace("backward:G")
            self.optimizer.step()
        return {"synthetic": inputs.detach()}, time.time() - start

    @torch.no_grad()
    def sample(self):
        return self.generator(torch.randn(self.bs, self.nz)), 0.0


class DeepInvSyntheiszer(BaseSynthesis):
    def __init__(
        self,
        teacher,
        student,
        num_classes,
        img_size,
        iterations=2,
        synthesis_batch_size=4,
        adv=1.0,
        bn=1,
        oh=1,
        device="cpu",
    ):
        super().__init__(teacher, student)
        self.num_classes, self.img, self.iterations, self.bs = (
            num_classes,
            img_size,
            iterations,
            synthesis_batch_size,
        )
        self.data = None

    def synthesize(self, targets=None):
        self.student.eval()
        inputs = torch.randn(self.bs, *self.img, requires_grad=True)
        targets = torch.arange(self.bs) % self.num_classes
        optimizer = torch.optim.Adam([inputs], 0.1)
        for _ in range(self.iterations):
            inputs_aug = inputs.flip(3)
            t_out = self.teacher(inputs_aug)
            s_out = self.student(inputs_aug)
            loss = F.cross_entropy(t_out, targets) - _kl(s_out, t_out)
            optimizer.zero_grad()
            trace("loss:G", loss)
            loss.backward()
            trace("backward:G")
            optimizer.step()
        self.student.train()
        self.data = inputs.detach()
        return {"synthetic": self.data}

    def sample(self):
        return self.data


class FastSynthesizer(CMISynthesizer):
    def __init__(self, teacher, student, generator, nz, num_classes, img_size, iterations=2,
                 synthesis_batch_size=4, adv=0.5, bn=1, oh=1, bn_mmt=0.9, device="cpu"):
        super().__init__(teacher, student, generator, nz, num_classes, img_size, iterations,
                         synthesis_batch_size, adv, bn, oh, cr=0.0)

    def synthesize(self, targets=None):
        return super().synthesize(targets)


class FastMetaSynthesizer(FastSynthesizer):
    def synthesize(self, targets=None):
        return super().synthesize(targets)
