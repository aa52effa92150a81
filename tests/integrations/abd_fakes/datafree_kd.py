"""Fake ``datafree_kd.py``: ``main_worker`` calls ``train`` by global name (hosts.md 4(b))."""
import types

import torch
import torch.nn.functional as F

from . import datafree_synthesis as synthesis_module
from .common import TinyGenerator, TinyNet, trace


def make_args(**kw):
    base = dict(epochs=2, start_epoch=0, warmup=0, ep_steps=4, kd_steps=2, gpu=None, method="cmi")
    base.update(kw)
    return types.SimpleNamespace(**base)


def build(method, teacher, student, synthesis=synthesis_module):
    gen = TinyGenerator()
    if method == "cmi":
        return synthesis.CMISynthesizer(
            teacher, student, gen, nz=8, num_classes=4, img_size=(3, 8, 8)
        )
    if method == "fast":
        return synthesis.FastSynthesizer(
            teacher, student, gen, nz=8, num_classes=4, img_size=(3, 8, 8)
        )
    if method == "fast_meta":
        return synthesis.FastMetaSynthesizer(
            teacher, student, gen, nz=8, num_classes=4, img_size=(3, 8, 8)
        )
    if method == "deepinv":
        return synthesis.DeepInvSyntheiszer(teacher, student, num_classes=4, img_size=(3, 8, 8))
    # Fast-Datafree builds the generative synthesizer with student=teacher
    return synthesis.GenerativeSynthesizer(teacher, teacher, gen, nz=8, img_size=(3, 8, 8))


def main_worker(args, teacher=None, student=None):
    teacher = teacher or TinyNet()
    student = student or TinyNet()
    synthesizer = build(args.method, teacher, student)
    optimizer = torch.optim.SGD(student.parameters(), 0.01, momentum=0.9)
    for epoch in range(args.start_epoch, args.epochs):
        for _ in range(args.ep_steps // args.kd_steps):
            synthesizer.synthesize()
            if epoch >= args.warmup:
                train(synthesizer, [student, teacher], None, optimizer, args)
    return teacher, student


def train(synthesizer, model, criterion, optimizer, args):
    student, teacher = model
    student.train()
    teacher.eval()
    for _ in range(args.kd_steps):
        images = synthesizer.sample()
        if isinstance(images, tuple):
            images = images[0]
        with torch.no_grad():
            t_out, t_feat = teacher(images, return_features=True)
        s_out = student(images.detach())
        loss_s = F.kl_div(
            F.log_softmax(s_out, 1), F.softmax(t_out.detach(), 1), reduction="batchmean"
        )
        optimizer.zero_grad()
        trace("loss:S", loss_s)
        loss_s.backward()
        trace("backward:S")
        optimizer.step()
