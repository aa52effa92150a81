"""Model zoo: forward shapes, architecture sizes, generator ranges, seeded init."""

import pytest
import torch

from abd_plugin.kit.models import get_model, list_models

CLASSIFIERS = [
    "lenet5",
    "lenet5_half",
    "lenet5_bn",
    "cnn5",
    "wrn16_1",
    "wrn16_2",
    "wrn40_2",
    "resnet18",
    "resnet34",
    "resnet8",
    "cnn3",
]
GENERATORS = ["generator_zskt", "generator_dfad", "generator_cmi"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_list_models():
    assert set(list_models()) == set(CLASSIFIERS) | set(GENERATORS)


SMALL = ["lenet5", "lenet5_half", "cnn5", "wrn16_1"]


@pytest.mark.parametrize(
    "name, in_channels, num_classes",
    [(n, 3, 10) for n in CLASSIFIERS]
    + [(n, 1, 7) for n in SMALL],  # big ones once: init is slow on CPU
)
def test_classifier_forward_shape(name, in_channels, num_classes):
    torch.manual_seed(0)
    model = get_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    out = model(torch.rand(2, in_channels, 32, 32))
    assert (
        isinstance(out, torch.Tensor)
        and out.shape == (2, num_classes)
        and torch.isfinite(out).all()
    )


@pytest.mark.parametrize("size", [8, 16, 32])
def test_cnn5_any_size(size):
    model = get_model("cnn5", in_channels=1, width=8)
    assert model(torch.rand(3, 1, size, size)).shape == (3, 10)
    out = model(torch.rand(3, 1, size, size))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    # standard sizes: LeNet-5 (3-channel input), WRN-16-1 0.17M, WRN-16-2 0.69M, WRN-40-2 2.2M,
    # ResNet-18 11.2M
    [
        ("lenet5", 62006),
        ("wrn16_1", 175066),
        ("wrn16_2", 691674),
        ("wrn40_2", 2243546),
        ("resnet18", 11173962),
        ("resnet34", 21282122),
        ("resnet8", 87642),
        ("cnn3", 47818),
    ],
)
def test_architecture_sizes(name, expected):
    assert n_params(get_model(name)) == expected


def test_cnn5_width_and_lenet_half_are_smaller():
    assert n_params(get_model("cnn5", width=16)) < n_params(get_model("cnn5"))
    assert n_params(get_model("lenet5_half")) < n_params(get_model("lenet5")) / 3


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_output(name):
    torch.manual_seed(0)
    gen = get_model(name)
    assert gen.z_dim == {"generator_zskt": 100, "generator_dfad": 256, "generator_cmi": 256}[name]
    img = gen(torch.randn(4, gen.z_dim))
    assert img.shape == (4, 3, 32, 32) and img.min() >= 0 and img.max() <= 1  # sigmoid: image range
    assert img.std() > 0.01
    small = get_model(name, img_size=16, channels=1, z_dim=8)
    assert small.z_dim == 8 and small(small.sample_z(2)).shape == (2, 1, 16, 16)
    bn = get_model(name, out="bn").train()
    z = torch.randn(16, bn.z_dim)
    assert bn(z).mean().abs() < 1e-4  # affine-free BN output (ZSKT/DFAD style, normalised space)
    assert get_model(name, out="tanh")(z).min() >= -1
    with pytest.raises(ValueError, match="divisible by 4"):
        get_model(name, img_size=30)


@pytest.mark.parametrize("name", ["wrn16_1", "cnn5", "generator_cmi"])
def test_init_is_deterministic_under_manual_seed(name):
    torch.manual_seed(3)
    a = get_model(name).state_dict()
    torch.manual_seed(3)
    b = get_model(name).state_dict()
    torch.manual_seed(4)
    c = get_model(name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(
        not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1
    )


def test_wrn_rejects_bad_depth():
    from abd_plugin.kit.models import WideResNet

    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(15, 1)
