"""Shared bits of the fake hosts: tiny models and the call-order trace.

The fakes are written here from the call structure in docs/hosts.md (names, signatures, order of
teacher forward / loss / backward / step); no host code is copied.
"""
import torch.nn.functional as F
from torch import nn


class _Events(list):
    students: list = []


EVENTS = _Events()


def trace(name, loss=None):
    """Record a host event; for a loss, also record whether the SV term is in its graph."""
    if loss is not None and graph_has_sv(loss):
        EVENTS.append("sv_in_graph:" + name.split(":")[-1])
    EVENTS.append(name)


def graph_has_sv(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "_AddLossTermBackward":
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


class TinyNet(nn.Module):
    """conv-bn-relu-conv-pool-fc; optional tuple output or features, like the hosts' models."""

    def __init__(self, n_classes=4, width=6, tuple_out=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, n_classes)
        self.tuple_out = tuple_out

    def forward(self, x, return_features=False, out_feature=False):
        a = F.relu(self.bn1(self.conv1(x)))
        f = F.relu(self.conv2(a)).mean((2, 3))
        logits = self.fc(f)
        if self.tuple_out:
            return logits, a
        if return_features or out_feature:
            return logits, f
        return logits


class TinyGenerator(nn.Module):
    def __init__(self, nz=8, img=8):
        super().__init__()
        self.nz, self.img = nz, img
        self.fc = nn.Linear(nz, 3 * img * img)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, z):
        return self.bn(self.fc(z.flatten(1)).view(-1, 3, self.img, self.img))
