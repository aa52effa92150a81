"""Test helpers shared by the core tests: tiny models, a trigger, a tiny poisoned CNN."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """3 convs + BN + global pooling; ``mode`` picks the output container."""

    def __init__(
        self, width: int = 8, in_ch: int = 1, classes: int = 10, mode: str = "tensor"
    ) -> None:
        super().__init__()
        self.mode = mode
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)))
        c = F.relu(self.conv3(b))
        logits = self.fc(c.mean((2, 3)))
        if self.mode == "tuple":
            return logits, a, b
        if self.mode == "dict":
            return {"logits": logits, "feat": c}
        return logits


class TinyGenerator(nn.Module):
    def __init__(self, z_dim: int = 8, size: int = 8, ch: int = 1) -> None:
        super().__init__()
        self.z_dim, self.size, self.ch = z_dim, size, ch
        self.fc = nn.Linear(z_dim, ch * size * size)

    def forward(self, z):
        return torch.sigmoid(self.fc(z)).view(-1, self.ch, self.size, self.size)


def make_pair(seed: int = 0, mode: str = "tensor"):
    torch.manual_seed(seed)
    teacher = TinyCNN(8, mode=mode).eval()
    student = TinyCNN(4, mode=mode)
    return teacher, student


def stamp(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 white patch in the bottom-right corner (the tiny test trigger)."""
    x = x.clone()
    x[..., -3:, -3:] = 1.0
    return x


@functools.lru_cache(maxsize=1)
def _poisoned_digits_cnn():
    """Trained single-threaded whatever the session's thread count (another count changes the
    last bits of the weights, and tests that pin numbers depend on them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_poisoned_digits_cnn()
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _clean_digits_cnn():
    """The same CNN trained on the same digits without poison (single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_poisoned_digits_cnn(poison_count=0)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _blend_digits_cnn():
    """The same CNN poisoned with a blend trigger: a fixed noise image mixed over the whole
    input at 0.2, target class 3 (single-threaded). Returns (model, x_test, y_test, trigger)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_poisoned_digits_cnn(trigger=blend_noise, target=3)
    finally:
        torch.set_num_threads(threads)


def blend_noise(x: torch.Tensor) -> torch.Tensor:
    """The blend test trigger: ``0.8 x + 0.2 P`` with a fixed uniform-noise image ``P``."""
    pattern = torch.rand((1,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(5))
    return 0.8 * x + 0.2 * pattern


def _train_poisoned_digits_cnn(poison_count: int = 140, trigger=None, target: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="nearest")
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    xtr, ytr = x[train].clone(), y[train].clone()
    poison = torch.arange(len(ytr))[ytr != target][:poison_count]
    xtr[poison] = (trigger or stamp)(xtr[poison])
    ytr[poison] = target
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(12):
        p = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            b = p[i:i + 64]
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    if trigger is not None:
        return model, x[test], y[test], trigger
    return model, x[test], y[test]




def record_of(report, kind):
    """The guard report's record of type ``kind`` (it must be there)."""
    out = report.get(kind)
    assert out is not None, f"no {kind.__name__} in {list(report.records)}"
    return out
