"""Fake ``network.gan``: a small generator whose output is an affine-free BatchNorm (normalised
images, as the host's generator)."""
import torch.nn.functional as F
from torch import nn


class GeneratorA(nn.Module):
    def __init__(self, nz=100, ngf=8, nc=1, img_size=32):
        super().__init__()
        self.side = img_size // 4
        self.ngf = ngf
        self.fc = nn.Linear(nz, ngf * self.side * self.side)
        self.conv = nn.Conv2d(ngf, nc, 3, padding=1)
        self.out = nn.BatchNorm2d(nc, affine=False)

    def forward(self, z):
        h = self.fc(z.flatten(1)).view(z.shape[0], self.ngf, self.side, self.side)
        h = F.interpolate(h, scale_factor=4)
        return self.out(self.conv(h).tanh())
