"""Fake ``DFAD_mnist.py`` (docs/hosts.md section 7): an argparse ``main()`` that loads the teacher
from ``--ckpt``, builds student and generator, and calls ``train`` and ``test`` by global name once
per epoch; ``get_dataloader`` is a global of this module."""
import argparse
import os

import network
import torch
import torch.nn.functional as F

CALLS = []


def get_dataloader(args):
    raise RuntimeError("the fake host's get_dataloader would download MNIST; the launcher must "
                       "replace it")


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
            loss_S = F.l1_loss(student(fake), teacher(fake).detach())
            loss_S.backward()
            optimizer_S.step()
        z = torch.randn((args.batch_size, args.nz, 1, 1))
        optimizer_G.zero_grad()
        fake = generator(z)
        loss_G = -F.l1_loss(student(fake), teacher(fake))
        loss_G.backward()
        optimizer_G.step()
    CALLS.append(("train", epoch))


def test(args, student, generator, device, test_loader, epoch=0):
    student.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            correct += int((student(data).argmax(1) == target).sum())
    CALLS.append(("test", epoch))
    return correct / len(test_loader.dataset)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--epoch_itrs", type=int, default=50)
    p.add_argument("--lr_S", type=float, default=0.01)
    p.add_argument("--lr_G", type=float, default=1e-3)
    p.add_argument("--nz", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ckpt", type=str, default="checkpoint/teacher/mnist-lenet5.pt")
    p.add_argument("--no-cuda", action="store_true", default=False)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    os.makedirs("checkpoint/student", exist_ok=True)
    _, test_loader = get_dataloader(args)
    teacher = network.lenet.LeNet5()
    student = network.lenet.LeNet5Half()
    generator = network.gan.GeneratorA(nz=args.nz, nc=1, img_size=32)
    teacher.load_state_dict(torch.load(args.ckpt))
    teacher.eval()
    optimizer_S = torch.optim.SGD(student.parameters(), lr=args.lr_S, momentum=0.9)
    optimizer_G = torch.optim.Adam(generator.parameters(), lr=args.lr_G)
    best = 0.0
    for epoch in range(1, args.epochs + 1):
        train(args, teacher=teacher, student=student, generator=generator, device="cpu",
              optimizer=[optimizer_S, optimizer_G], epoch=epoch)
        acc = test(args, student, generator, "cpu", test_loader, epoch)
        if acc > best:
            best = acc
            torch.save(student.state_dict(), "checkpoint/student/mnist-lenet5_half.pt")
