"""Fake ``DFAD_cifar.py`` (hosts.md section 7): module-level ``train`` called by name from main."""
import types

import torch
import torch.nn.functional as F

from .common import TinyGenerator, trace


def make_args(**kw):
    base = dict(epochs=2, epoch_itrs=1, batch_size=4, nz=8)
    base.update(kw)
    return types.SimpleNamespace(**base)


def train(args, teacher, student, generator, device, optimizer, epoch):
    teacher.eval()
    student.train()
    generator.train()
    optimizer_S, optimizer_G = optimizer
    for _i in range(args.epoch_itrs):
        for _k in range(5):
            z = torch.randn((args.batch_size, args.nz, 1, 1))
            optimizer_S.zero_grad()
            fake = generator(z).detach()
            t_logit = teacher(fake)
            s_logit = student(fake)
            loss_S = F.l1_loss(s_logit, t_logit.detach())
            trace("loss:S", loss_S)
            loss_S.backward()
            trace("backward:S")
            optimizer_S.step()
        z = torch.randn((args.batch_size, args.nz, 1, 1))
        optimizer_G.zero_grad()
        generator.train()
        fake = generator(z)
        t_logit = teacher(fake)
        s_logit = student(fake)
        loss_G = -F.l1_loss(s_logit, t_logit)
        trace("loss:G", loss_G)
        loss_G.backward()
        trace("backward:G")
        optimizer_G.step()


def main(args, teacher, student):
    generator = TinyGenerator(nz=args.nz)
    optimizer_S = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    optimizer_G = torch.optim.Adam(generator.parameters(), lr=1e-3)
    for epoch in range(1, args.epochs + 1):
        train(args, teacher=teacher, student=student, generator=generator, device="cpu",
              optimizer=[optimizer_S, optimizer_G], epoch=epoch)
