"""Adapters against real host checkouts. Each test runs only when ``ABD_HOST_<NAME>`` points at a
checkout of the supported commit (see each adapter's ``SUPPORTED``); otherwise it is skipped.

Unrelated imports the hosts need at import time (ZSKT's TensorFlow logger, DFAD's visdom client,
Fast-Datafree's kornia augmentations) are stubbed when they are not installed; the synthesizers
exercised here do not use them.
"""
import contextlib
import importlib
import os
import sys
import types

import pytest
import torch

from conftest import assert_restored, global_hook_counts, module_hooks, snapshot


def _sv_calls(guard):
    from abd_plugin.vaccine import VaccineReport

    return guard.report().get(VaccineReport).calls


def _checkout(name):
    root = os.environ.get(f"ABD_HOST_{name}")
    if not root:
        pytest.skip(f"set ABD_HOST_{name}=/path/to/checkout to run against the real host")
    return root


@contextlib.contextmanager
def host_path(root, stubs=(), purge=()):
    """Put ``root`` first on sys.path, stub missing modules, and forget the host's modules after."""
    saved_path, saved = list(sys.path), dict(sys.modules)
    sys.path.insert(0, root)
    for name in stubs:
        try:
            importlib.import_module(name)
        except Exception:
            sys.modules[name] = _stub(name)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in list(sys.modules):
            if name not in saved and (name.split(".")[0] in purge or name in stubs):
                del sys.modules[name]


def _stub(name):
    """A module whose every public attribute is a pass-through callable (never used by the code
    paths exercised here; e.g. termcolor.colored(s) returns s)."""
    mod = types.ModuleType(name)

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *a, **k: a[0] if a else None

    mod.__getattr__ = getattr_
    return mod


@pytest.mark.parametrize("name", ["FAST_DATAFREE", "CMI"])
def test_datafree_generative_and_deepinv(name, events, fast_cfg):
    root = _checkout(name)
    with host_path(
        root,
        stubs=(
            "termcolor",
            "torchvision.models.utils",
            "kornia",
            "kornia.augmentation",
            "kornia.geometry",
            "kornia.geometry.transform",
            "kornia.geometry.transform.affwarp",
        ),
        purge=("datafree", "datafree_kd", "registry"),
    ):
        import datafree
        import datafree_kd
        from datafree.models.classifiers.wresnet import wrn_16_1
        from datafree.models.generator import Generator

        from abd_plugin.integrations import datafree as adapter

        torch.manual_seed(0)
        teacher, student = wrn_16_1(num_classes=10).eval(), wrn_16_1(num_classes=10)
        events.students.append(student)
        kl = datafree.criterions.KLDiv(T=1)
        norm = datafree.utils.Normalizer(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        gen = Generator(nz=16, ngf=8, img_size=32)
        fast = hasattr(datafree.synthesis, "FastSynthesizer")
        synth = datafree.synthesis.GenerativeSynthesizer(
            teacher, teacher if fast else student, gen, nz=16, img_size=(3, 32, 32), iterations=1,
            synthesis_batch_size=4, sample_batch_size=4, adv=1.0, oh=1.0, criterion=kl,
            normalizer=norm, device="cpu")
        args = types.SimpleNamespace(kd_steps=2, ep_steps=2, epochs=2, start_epoch=0, warmup=0,
                                     gpu=None, method="zskt", autocast=contextlib.nullcontext,
                                     fp16=False, print_freq=0, current_epoch=0)
        optimizer = torch.optim.SGD(student.parameters(), 0.01)
        dinv = datafree.synthesis.DeepInvSyntheiszer(  # registers the host's own BN hooks
            teacher, student, num_classes=10, img_size=(3, 32, 32), iterations=2,
            synthesis_batch_size=4, sample_batch_size=4, adv=1.0, normalizer=norm,
            save_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "abd_dinv"), device="cpu")
        host_hooks = module_hooks(teacher, student)
        snap, hooks0 = (
            snapshot(
                datafree_kd,
                *[
                    getattr(datafree.synthesis, n)
                    for n in adapter.SYNTHESIZERS
                    if hasattr(datafree.synthesis, n)
                ],
            ),
            global_hook_counts(),
        )
        with adapter.patch(datafree_kd, synthesis=datafree.synthesis, **fast_cfg) as h:
            for _ in range(2):  # main_worker's loop: synthesize, then train
                synth.synthesize()
                datafree_kd.train(synth, [student, teacher], kl, optimizer, args)
            n_sv = _sv_calls(h.guard)
            dinv.synthesize()
            assert _sv_calls(h.guard) == n_sv + 2  # one SV term per inversion step
        assert h.guard.step == 4 and events.count("sr") == 4
        # Fast-Datafree builds the generative synthesizer with student=teacher: the first
        # synthesize() precedes the guard; CMI passes the real student
        assert events.count("sv") == (1 if fast else 2) + 2
        assert_restored(snap, ignore=("time_cost",))
        assert global_hook_counts() == hooks0 and module_hooks(teacher, student) == host_hooks


def test_zskt_solver(events, fast_cfg):
    root = _checkout("ZSKT")
    with host_path(root, stubs=("tensorflow",), purge=("solver", "utils", "models")):
        import solver
        from models.wresnet import WideResNet
        from utils.loaders import LearnableLoader

        from abd_plugin.integrations import zskt as adapter

        torch.manual_seed(0)
        args = types.SimpleNamespace(total_n_pseudo_batches=2, n_generator_iter=1, n_student_iter=2,
                                     batch_size=4, z_dim=16, KL_temperature=1.0, AT_beta=250.0,
                                     dataset="CIFAR10", device="cpu", log_freq=10**9,
                                     save_n_checkpoints=0, save_final_model=False)
        # run() needs only these attributes; __init__ would load checkpoints and datasets
        s = object.__new__(solver.ZeroShotKTSolver)
        s.args = args
        s.teacher = WideResNet(depth=16, num_classes=10, widen_factor=1, dropRate=0.0).eval()
        s.student = WideResNet(depth=16, num_classes=10, widen_factor=1, dropRate=0.0).train()
        events.students.append(s.student)
        s.n_repeat_batch = 3
        s.generator = LearnableLoader(args=args, n_repeat_batch=3)
        s.optimizer_generator = torch.optim.Adam(s.generator.parameters(), lr=1e-3)
        s.optimizer_student = torch.optim.Adam(s.student.parameters(), lr=2e-3)
        s.scheduler_generator = torch.optim.lr_scheduler.CosineAnnealingLR(s.optimizer_generator, 2)
        s.scheduler_student = torch.optim.lr_scheduler.CosineAnnealingLR(s.optimizer_student, 2)
        s.n_pseudo_batches = 0
        s.test = lambda: 0.0  # the end-of-run evaluation needs the test set
        snap, hooks0 = snapshot(solver.ZeroShotKTSolver), global_hook_counts()
        with adapter.patch(solver.ZeroShotKTSolver, **fast_cfg) as h:
            s.run()
        assert events.count("sv") == 2 and events.count("sr") == 4 and h.guard.step == 4
        assert_restored(snap)
        assert global_hook_counts() == hooks0 and module_hooks(s.teacher, s.student) == 0


def test_dfad_mnist(events, fast_cfg):
    root = _checkout("DFAD")
    with host_path(
        root,
        stubs=("visdom", "torchvision.models.utils"),
        purge=("DFAD_mnist", "network", "dataloader", "utils"),
    ):
        import DFAD_mnist
        from network.gan import GeneratorA
        from network.lenet import LeNet5, LeNet5Half

        from abd_plugin.integrations import dfad as adapter

        torch.manual_seed(0)
        teacher, student = LeNet5().eval(), LeNet5Half()
        events.students.append(student)
        gen = GeneratorA(nz=16, nc=1, img_size=32)
        args = types.SimpleNamespace(
            epoch_itrs=1, batch_size=4, nz=16, epochs=1, log_interval=10**9, verbose=False
        )
        opt = [torch.optim.SGD(student.parameters(), 0.1), torch.optim.Adam(gen.parameters(), 1e-3)]
        snap, hooks0 = snapshot(DFAD_mnist), global_hook_counts()
        with adapter.patch(DFAD_mnist, **fast_cfg) as h:
            DFAD_mnist.train(args, teacher=teacher, student=student, generator=gen, device="cpu",
                             optimizer=opt, epoch=1)
        assert events.count("sv") == 1 and events.count("sr") == 5 and h.guard.step == 5
        ev = [e for e in events if e in ("sv", "sr", "step:S", "step:G")]
        assert ev == ["sr", "step:S"] * 5 + ["sv", "step:G"]
        assert_restored(snap)
        assert global_hook_counts() == hooks0 and module_hooks(teacher, student) == 0


def test_deepinversion_binds(fast_cfg):
    """NVlabs hard-codes CUDA inside ``get_images``; on CPU only the binding is checked."""
    root = _checkout("DEEPINVERSION")
    with host_path(root, purge=("deepinversion", "utils")):
        import deepinversion

        from abd_plugin.integrations import deepinversion as adapter

        snap = snapshot(deepinversion.DeepInversionClass)
        with adapter.patch(deepinversion.DeepInversionClass, **fast_cfg):
            assert deepinversion.DeepInversionClass.get_images.__abd_wrapped__ is not None
        assert_restored(snap)
    with host_path(os.path.join(root, "cifar10"), purge=("deepinversion_cifar10", "resnet_cifar")):
        import deepinversion_cifar10 as cifar

        from abd_plugin.integrations import deepinversion as adapter

        snap = snapshot(cifar)
        with adapter.patch_cifar(cifar, **fast_cfg):
            pass
        assert_restored(snap)
