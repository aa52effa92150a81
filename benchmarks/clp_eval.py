"""Evaluation of a one-off teacher repair: channel-Lipschitz pruning (CLP; Zheng et al., ECCV 2022,
"Data-free Backdoor Removal based on Channel Lipschitzness"), written from the paper's description.

For every conv layer, each output channel's score is the largest singular value of its kernel
(times |gamma / sigma| of the BatchNorm that follows, where there is one); channels scoring above
``mean + u * std`` of their layer are zeroed. Prints the kit teachers' ACC / ASR (%) before and
after, for several ``u`` (the official default is 3). No data is used by the repair; the test
split only measures it. Usage: ``python benchmarks/clp_eval.py`` (about a minute on a CPU).
Result (README, "Results"): CLP is not shipped.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from abd_plugin.kit.datasets import load_dataset
from abd_plugin.kit.metrics import accuracy, attack_success_rate
from abd_plugin.kit.poison import TeacherSpec, train_teacher
from abd_plugin.kit.triggers import get_trigger

TEACHERS = [("lenet5", "badnet_grid"), ("lenet5", "l0_inv"), ("lenet5", "trojan_wm"),
            ("lenet5", "square_in"), ("lenet5", None), ("lenet5_bn", "badnet_grid"),
            ("lenet5_bn", "square_in"), ("lenet5_bn", None)]
US = (0.5, 1.0, 1.5, 2.0, 3.0)


def channel_scores(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant."""
    w = conv.weight.detach()
    s = torch.stack([torch.linalg.svdvals(w[k].reshape(w.shape[1], -1)).max()
                     for k in range(w.shape[0])])
    if bn is not None:
        s = s * (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).abs()
    return s


def clp(model: nn.Module, u: float) -> tuple[nn.Module, int]:
    """A pruned copy of ``model`` (the model itself is untouched) and the channels zeroed."""
    m = copy.deepcopy(model)
    mods = list(m.modules())
    pruned = 0
    for i, mod in enumerate(mods):
        if not isinstance(mod, nn.Conv2d):
            continue
        bn = next((x for x in mods[i + 1:i + 3] if isinstance(x, nn.BatchNorm2d)), None)
        s = channel_scores(mod, bn)
        idx = s > s.mean() + u * s.std()
        with torch.no_grad():
            mod.weight[idx] = 0
            if mod.bias is not None:
                mod.bias[idx] = 0
        pruned += int(idx.sum())
    return m, pruned


def main() -> None:
    torch.set_num_threads(1)
    xte, yte = load_dataset("mnist5k", "test").tensors
    print("| teacher | trigger | original | " + " | ".join(f"u={u}" for u in US) + " |")
    print("|---|---|---|" + "---|" * len(US))
    for arch, trig in TEACHERS:
        t, _ = train_teacher(TeacherSpec(arch=arch, trigger=trig))
        tr = get_trigger(trig or "badnet_grid", seed=0)

        def cell(model: nn.Module, tr: object = tr) -> str:
            return (f"{accuracy(model, xte, yte):.1f} / "
                    f"{attack_success_rate(model, xte, yte, tr, 0):.1f}")  # type: ignore[arg-type]

        row = [arch, str(trig or "none (clean)"), cell(t)]
        for u in US:
            m, n = clp(t, u)
            row.append(f"{cell(m)} ({n} ch)")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
