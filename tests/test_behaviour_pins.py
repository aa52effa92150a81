"""Pinned behaviour: seeded guarded runs whose outputs must not change when the core is reshaped.

Each scenario runs a small data-free KD loop (a DFAD-style generator, the poisoned digits CNN or a
clean one as the teacher) under one guard configuration and returns a fingerprint: two float64
sums of the student's final parameters and the guard's printed report with its timings masked.
The pins below were recorded on the code before the settings sections / report records / eraser
split (issue 16); after it every number is bit-identical on the recording machine, and the
printed reports are word for word the same except one added line (the KDIGA hook's record is now
printed like the built-in defenses'). The input-domain line (the report's second, saying which
range the audit searched and where it came from) was added later with the numbers unchanged
(these teachers are fed [0, 1] batches, whose range comes before the teacher's BatchNorm
evidence). The tolerance only absorbs a different CPU's last bits (these runs are short, so those
stay tiny).

Re-recorded for issue 17 (an intended behaviour change): every report gained the input-domain
line and the audit's "How:" line (its second statistic), and a flagged teacher's mask now waits
on probation. Student sums: ``classic``, ``paper`` and ``default_clean`` are unchanged;
``default_poisoned_no_probation`` (the probation off) equals the earlier ``default_poisoned``
pin exactly; ``default_poisoned``, ``default_poisoned_recheck``, ``resumed`` and
``default_iga`` changed because the mask is still on probation after these 24 iterations (their
students equal one another), and ``forced_clean`` now equals ``default_clean`` (the mask forced
on a clean teacher waits, unconfirmed: the run is bit-identical to the unforced one).

Re-recorded for issue 17's calibrated audit null (the reports' p-values are calibrated and the
verdict's "How:" line gives both statistics' p-values and the suspect's evidence): every student
sum is bit-identical; only the report texts changed.

Re-recorded for issue 17's universal patch statistic (the audit's look before ``clean``): every
student sum is bit-identical; the two clean-teacher reports' "How:" line now ends with the patch
statistic's vote (below its threshold, so the verdict stays ``clean``).

Machines: the pins are exact only on the CPU they were recorded on (a 24-iteration run turns
another CPU's last bits into different audit margins and, in ``classic``, a different vaccine
decision). ``PINS`` is the first recording machine's; ``PINS_BY_MACHINE`` holds more, keyed by a
fingerprint of the machine's arithmetic (:func:`_machine`: plain torch code, nothing of
abd_plugin). Relations between the runs (a resumed run equals an uninterrupted one, a forced mask
on a clean teacher changes nothing, the verdicts) are checked on every machine.

Re-record (only when a behaviour change is intended, and say so in the commit):
``python tests/test_behaviour_pins.py`` prints this machine's fingerprint and pins; a behaviour
change re-records every machine's pins, or drops the ones it cannot re-record.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_plugin import ABDConfig, ABDGuard, InputGradientAlignment
from abd_testutils import TinyCNN, _poisoned_digits_cnn


class _Gen(nn.Module):
    """A tiny conv generator of 16x16 images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8 * 4 * 4)
        self.conv = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).view(-1, 8, 4, 4)
        return torch.sigmoid(self.conv(F.interpolate(h, size=16)))


def _clean_teacher() -> nn.Module:
    torch.manual_seed(3)
    return TinyCNN(8, classes=10).eval()


def _dfad(teacher: nn.Module, student: nn.Module, gen: nn.Module, opt_s: Any, opt_g: Any,
          iters: range) -> None:
    for it in iters:
        z = torch.randn(24, 16, generator=torch.Generator().manual_seed(1000 + it))
        x = gen(z)
        # a third of each batch carries the trigger, as a generator's samples sometimes do
        corner = torch.zeros_like(x, dtype=torch.bool)
        corner[:8, :, -3:, -3:] = True
        x = torch.where(corner, torch.ones_like(x), x)
        loss_g = -F.l1_loss(student(x), teacher(x))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        x = x.detach()
        for _ in range(2):
            with torch.no_grad():
                t = teacher(x)
            loss_s = F.l1_loss(student(x), t)
            opt_s.zero_grad()
            loss_s.backward()
            opt_s.step()


def _setup(teacher_kind: str) -> tuple[nn.Module, nn.Module, nn.Module, Any, Any]:
    teacher = _poisoned_digits_cnn()[0] if teacher_kind == "poisoned" else _clean_teacher()
    torch.manual_seed(0)
    student = TinyCNN(4, classes=10)
    gen = _Gen()
    opt_s = torch.optim.Adam(student.parameters(), 1e-2)
    opt_g = torch.optim.Adam(gen.parameters(), 1e-3)
    return teacher, student, gen, opt_s, opt_g


def _fingerprint(student: nn.Module, guard: ABDGuard) -> dict[str, Any]:
    flat = torch.cat([p.detach().double().flatten() for p in student.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).sin()
    text = re.sub(r"\d+(\.\d+)?s\b", "<t>s", str(guard.report()))
    return {"sum": float(flat.sum()), "wsum": float((flat * weights).sum()), "report": text}


def _run(teacher_kind: str, make_guard: Callable[..., ABDGuard], iters: int = 24
         ) -> dict[str, Any]:
    teacher, student, gen, opt_s, opt_g = _setup(teacher_kind)
    with make_guard(teacher, student) as guard:
        _dfad(teacher, student, gen, opt_s, opt_g, range(iters))
    return _fingerprint(student, guard)


#: a re-audit every 4 mask updates from the 8th (the default waits for 100): the check runs here.
#: The spectral gain's probation check at update 20 passes here once; since the gain acts on one
#: passing check after a poisoned verdict (``erase_confirm_spectral``, issue 17), these runs keep
#: the two it needed when the pins were recorded, so the gain stays on probation and the runs
#: compare the re-audits' reads as before (the pins unchanged on every machine).
_FAST_RECHECK = dict(erase_recheck=4, erase_every=1, erase_confirm_spectral=2)


def _resumed() -> dict[str, Any]:
    """12 iterations, state saved and loaded into a new guard, 12 more."""
    teacher, student, gen, opt_s, opt_g = _setup("poisoned")
    cfg = ABDConfig(**_FAST_RECHECK)
    guard = ABDGuard(teacher, student, config=cfg)
    with guard:
        _dfad(teacher, student, gen, opt_s, opt_g, range(12))
    state = guard.state_dict()
    guard = ABDGuard(teacher, student, config=cfg)
    guard.load_state_dict(state)
    with guard:
        _dfad(teacher, student, gen, opt_s, opt_g, range(12, 24))
    return _fingerprint(student, guard)


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "default_poisoned": lambda: _run("poisoned", lambda t, s: ABDGuard(t, s)),
    # the eraser without its probation (issue 17): the student's numbers equal the
    # default_poisoned pins recorded before the probation existed
    "default_poisoned_no_probation": lambda: _run(
        "poisoned", lambda t, s: ABDGuard(t, s, erase_confirm=0)),
    "default_poisoned_recheck": lambda: _run(
        "poisoned", lambda t, s: ABDGuard(t, s, **_FAST_RECHECK)),
    "default_clean": lambda: _run("clean", lambda t, s: ABDGuard(t, s)),
    "forced_clean": lambda: _run("clean", lambda t, s: ABDGuard(t, s, erase_on="always")),
    "classic": lambda: _run("poisoned", lambda t, s: ABDGuard(
        t, s, config=ABDConfig.classic(verify_batches=4, verify_skip=1, sr_start_step=30))),
    "paper": lambda: _run("poisoned", lambda t, s: ABDGuard(
        t, s, config=ABDConfig.paper(verify=False, sr_start_step=36, sr_inner_rounds=3))),
    "default_iga": lambda: _run("poisoned", lambda t, s: ABDGuard(
        t, s, hooks=[InputGradientAlignment(s, t, gamma=1.0, fgsm_eps=0.1, clamp=(0.0, 1.0))])),
    "resumed": _resumed,
}

PINS: dict[str, dict[str, Any]] = {'classic': {'report': 'abd-plugin guard report\n'
                       '  Input domain: inputs in [0, 1] (read off the first batch: values in '
                       '[0, 1]).\n'
                       '  Teacher audit: not run (audit=False)\n'
                       '  Trigger eraser: off (erase=False).\n'
                       '  SV: no vaccine found after 8 shuffle(s) at depth 1, 5 depth(s) '
                       'scored first (best tail ratio 0.0000 <= 0.02) - SV is off; SR is '
                       'still available; suspicious fraction nan over 0 synthesis batches, '
                       '<t>s\n'
                       '  Self-Retrospection: 18 step(s) (window starts at step 30), <t>s.\n'
                       '  Student optimizer steps seen: 48.',
             'sum': 8.25706594978692,
             'wsum': -5.98235205305793},
 'default_clean': {'report': 'abd-plugin guard report\n'
                             '  Input domain: inputs in [0, 1] (read off the first batch: '
                             'values in [0, 1]).\n'
                             "  Teacher audit: no backdoor found (class 7's maximum margin "
                             '0.0927, p = 0.91, robust z = 5.8; <t>s).\n'
                             '    How: the margin statistic favours class 7 (p = 0.91); the '
                             'universal blend statistic favours class 7 (z = 2.7, p = 0.21); '
                             'class 7 is the suspect (both favour it); its evidence 2 x p = '
                             '0.43; the margin p reaches clean_alpha (0.5) and the universal '
                             'z is below flag_z (4): clean; the universal patch '
                             'statistic favours class 7 (z = 2.7), below patch_flag_z (7).\n'
                             '    The shuffled-teacher ensemble favours class 7 on the inputs '
                             'seen (agrees).\n'
                             '  Trigger eraser: off (audit verdict clean '
                             "(erase_on='flagged')).\n"
                             '  Shuffling Vaccine: off.\n'
                             '  Self-Retrospection: did not run.\n'
                             '  Student optimizer steps seen: 48.',
                   'sum': -3.816860363353044,
                   'wsum': -6.625549063632392},
 'default_iga': {'report': 'abd-plugin guard report\n'
                           '  Input domain: inputs in [0, 1] (read off the first batch: '
                           'values in [0, 1]).\n'
                           '  Teacher audit: the teacher looks BACKDOORED towards class 0 '
                           "(class 0's maximum margin 69.9, p = 0.003, robust z = 10.4; "
                           '<t>s).\n'
                           '    How: the margin statistic favours class 0 (p = 0.003); the '
                           'universal blend statistic favours class 0 (z = 3.1, p = 0.11); '
                           'class 0 is the suspect (both favour it); its evidence 2 x p = '
                           '0.006 is below alpha (0.05): poisoned.\n'
                           '    The shuffled-teacher ensemble favours class 0 on the inputs '
                           'seen (agrees).\n'
                           '  Trigger eraser: off, on probation (audit verdict poisoned for '
                           "class 0 (erase_on='flagged'): on probation, the mask must be "
                           'confirmed before it acts; 12 update(s) so far).\n'
                           '  Shuffling Vaccine: off.\n'
                           '  Self-Retrospection: did not run.\n'
                           '  Input-gradient alignment (KDIGA): 48 step(s), last term 1.53, '
                           '<t>s.\n'
                           '  Student optimizer steps seen: 48.',
                 'sum': 10.729437425499782,
                 'wsum': -8.207474365515536},
 'default_poisoned': {'report': 'abd-plugin guard report\n'
                                '  Input domain: inputs in [0, 1] (read off the first batch: '
                                'values in [0, 1]).\n'
                                '  Teacher audit: the teacher looks BACKDOORED towards class '
                                "0 (class 0's maximum margin 69.9, p = 0.003, robust z = "
                                '10.4; <t>s).\n'
                                '    How: the margin statistic favours class 0 (p = 0.003); '
                                'the universal blend statistic favours class 0 (z = 3.1, p = '
                                '0.11); class 0 is the suspect (both favour it); its evidence '
                                '2 x p = 0.006 is below alpha (0.05): poisoned.\n'
                                '    The shuffled-teacher ensemble favours class 0 on the '
                                'inputs seen (agrees).\n'
                                '  Trigger eraser: off, on probation (audit verdict poisoned '
                                "for class 0 (erase_on='flagged'): on probation, the mask "
                                'must be confirmed before it acts; 12 update(s) so far).\n'
                                '  Shuffling Vaccine: off.\n'
                                '  Self-Retrospection: did not run.\n'
                                '  Student optimizer steps seen: 48.',
                      'sum': 12.546596856089309,
                      'wsum': -6.383434932725678},
 'default_poisoned_no_probation': {'report': 'abd-plugin guard report\n'
                                             '  Input domain: inputs in [0, 1] (read off the '
                                             'first batch: values in [0, 1]).\n'
                                             '  Teacher audit: the teacher looks BACKDOORED '
                                             "towards class 0 (class 0's maximum margin 69.9, "
                                             'p = 0.003, robust z = 10.4; <t>s).\n'
                                             '    How: the margin statistic favours class 0 '
                                             '(p = 0.003); the universal blend statistic '
                                             'favours class 0 (z = 3.1, p = 0.11); class 0 is '
                                             'the suspect (both favour it); its evidence 2 x '
                                             'p = 0.006 is below alpha (0.05): poisoned.\n'
                                             '    The shuffled-teacher ensemble favours class '
                                             '0 on the inputs seen (agrees).\n'
                                             '  Trigger eraser: ON for class 0 (audit verdict '
                                             "poisoned (erase_on='flagged')). The teacher saw "
                                             'every input with 0 position(s) erased (mask 3.3 '
                                             '% of the input), learned in 11 update(s), '
                                             '<t>s.\n'
                                             '    At the last update the erasure moved 100 % '
                                             'of the samples the teacher called class 0 (0 % '
                                             'of the batch) to other classes and kept 100 % '
                                             "of the others' classes.\n"
                                             '  Shuffling Vaccine: off.\n'
                                             '  Self-Retrospection: did not run.\n'
                                             '  Student optimizer steps seen: 48.',
                                   'sum': 8.079390602826606,
                                   'wsum': -5.772908955708633},
 'default_poisoned_recheck': {'report': 'abd-plugin guard report\n'
                                        '  Input domain: inputs in [0, 1] (read off the first '
                                        'batch: values in [0, 1]).\n'
                                        '  Teacher audit: the teacher looks BACKDOORED '
                                        "towards class 0 (class 0's maximum margin 69.9, p = "
                                        '0.003, robust z = 10.4; <t>s).\n'
                                        '    How: the margin statistic favours class 0 (p = '
                                        '0.003); the universal blend statistic favours class '
                                        '0 (z = 3.1, p = 0.11); class 0 is the suspect (both '
                                        'favour it); its evidence 2 x p = 0.006 is below '
                                        'alpha (0.05): poisoned.\n'
                                        '    The shuffled-teacher ensemble favours class 0 on '
                                        'the inputs seen (agrees).\n'
                                        '  Trigger eraser: off, on probation (audit verdict '
                                        "poisoned for class 0 (erase_on='flagged'): on "
                                        'probation, the mask must be confirmed before it '
                                        'acts; 24 update(s) so far).\n'
                                        '  Shuffling Vaccine: off.\n'
                                        '  Self-Retrospection: did not run.\n'
                                        '  Student optimizer steps seen: 48.',
                              'sum': 12.546596856089309,
                              'wsum': -6.383434932725678},
 'forced_clean': {'report': 'abd-plugin guard report\n'
                            '  Input domain: inputs in [0, 1] (read off the first batch: '
                            'values in [0, 1]).\n'
                            "  Teacher audit: no backdoor found (class 7's maximum margin "
                            '0.0927, p = 0.91, robust z = 5.8; <t>s).\n'
                            '    How: the margin statistic favours class 7 (p = 0.91); the '
                            'universal blend statistic favours class 7 (z = 2.7, p = 0.21); '
                            'class 7 is the suspect (both favour it); its evidence 2 x p = '
                            '0.43; the margin p reaches clean_alpha (0.5) and the universal z '
                            'is below flag_z (4): clean; the universal patch '
                            'statistic favours class 7 (z = 2.7), below patch_flag_z (7).\n'
                            '    The shuffled-teacher ensemble favours class 7 on the inputs '
                            'seen (agrees).\n'
                            '  Trigger eraser: off, on probation (audit verdict clean for '
                            "class 7 (erase_on='always'): on probation, the mask must be "
                            'confirmed before it acts; 12 update(s) so far).\n'
                            '  Shuffling Vaccine: off.\n'
                            '  Self-Retrospection: did not run.\n'
                            '  Student optimizer steps seen: 48.',
                  'sum': -3.816860363353044,
                  'wsum': -6.625549063632392},
 'paper': {'report': 'abd-plugin guard report\n'
                     '  Input domain: inputs in [0, 1] (read off the first batch: values in '
                     '[0, 1]).\n'
                     '  Teacher audit: not run (audit=False)\n'
                     '  Trigger eraser: off (erase=False).\n'
                     "  SV: on, 4 shuffled layer(s) ['3', '6', '9', '12'], coef 0.1, 24 "
                     'batch(es) seen; suspicious fraction 0.000 over 24 synthesis batches, '
                     '<t>s\n'
                     '  Self-Retrospection: 12 step(s) (window starts at step 36), <t>s.\n'
                     '  Student optimizer steps seen: 48.',
           'sum': 12.96302442974411,
           'wsum': -6.484258558264415},
 'resumed': {'report': 'abd-plugin guard report\n'
                       '  Input domain: inputs in [0, 1] (read off the first batch: values in '
                       '[0, 1]).\n'
                       '  Teacher audit: the teacher looks BACKDOORED towards class 0 (class '
                       "0's maximum margin 69.9, p = 0.003, robust z = 10.4; <t>s).\n"
                       '    How: the margin statistic favours class 0 (p = 0.003); the '
                       'universal blend statistic favours class 0 (z = 3.1, p = 0.11); class '
                       '0 is the suspect (both favour it); its evidence 2 x p = 0.006 is '
                       'below alpha (0.05): poisoned.\n'
                       '    The shuffled-teacher ensemble favours class 0 on the inputs seen '
                       '(agrees).\n'
                       '  Trigger eraser: off, on probation (audit verdict poisoned for class '
                       "0 (erase_on='flagged'): on probation, the mask must be confirmed "
                       'before it acts; 24 update(s) so far).\n'
                       '  Shuffling Vaccine: off.\n'
                       '  Self-Retrospection: did not run.\n'
                       '  Student optimizer steps seen: 48.',
             'sum': 12.546596856089309,
             'wsum': -6.383434932725678}}


#: pins recorded on other machines, keyed by :func:`_machine` (an AMD EPYC CPU, 2026-12-06:
#: the code of ``PINS``, every run and report re-recorded there, nothing else changed)
_PINS_EPYC: dict[str, dict[str, Any]] = {'classic': {'report': 'abd-plugin guard report\n'
                       '  Input domain: inputs in [0, 1] (read off the first batch: values '
                       'in [0, 1]).\n'
                       '  Teacher audit: not run (audit=False)\n'
                       '  Trigger eraser: off (erase=False).\n'
                       "  SV: on, 1 shuffled layer(s) ['17'], coef 0.1, 20 batch(es) seen; "
                       'suspicious fraction 0.117 over 20 synthesis batches, <t>s\n'
                       '  Self-Retrospection: 18 step(s) (window starts at step 30), '
                       '<t>s.\n'
                       '  Student optimizer steps seen: 48.',
             'sum': 7.186422297614627,
             'wsum': -5.443131967632243},
 'default_clean': {'report': 'abd-plugin guard report\n'
                             '  Input domain: inputs in [0, 1] (read off the first batch: '
                             'values in [0, 1]).\n'
                             "  Teacher audit: no backdoor found (class 7's maximum margin "
                             '0.0927, p = 0.91, robust z = 5.8; <t>s).\n'
                             '    How: the margin statistic favours class 7 (p = 0.91); '
                             'the universal blend statistic favours class 7 (z = 2.7, p = '
                             '0.21); class 7 is the suspect (both favour it); its evidence '
                             '2 x p = 0.43; the margin p reaches clean_alpha (0.5) and the '
                             'universal z is below flag_z (4): clean; the universal patch '
                             'statistic favours class 7 (z = 2.7), below patch_flag_z '
                             '(7).\n'
                             '    The shuffled-teacher ensemble favours class 7 on the '
                             'inputs seen (agrees).\n'
                             '  Trigger eraser: off (audit verdict clean '
                             "(erase_on='flagged')).\n"
                             '  Shuffling Vaccine: off.\n'
                             '  Self-Retrospection: did not run.\n'
                             '  Student optimizer steps seen: 48.',
                   'sum': -3.827233434189111,
                   'wsum': -6.646459138325622},
 'default_iga': {'report': 'abd-plugin guard report\n'
                           '  Input domain: inputs in [0, 1] (read off the first batch: '
                           'values in [0, 1]).\n'
                           '  Teacher audit: the teacher looks BACKDOORED towards class 0 '
                           "(class 0's maximum margin 74.9, p = 0.0015, robust z = 13.6; "
                           '<t>s).\n'
                           '    How: the margin statistic favours class 0 (p = 0.0015); '
                           'the universal blend statistic favours class 0 (z = 3.1, p = '
                           '0.12); class 0 is the suspect (both favour it); its evidence 2 '
                           'x p = 0.003 is below alpha (0.05): poisoned.\n'
                           '    The shuffled-teacher ensemble favours class 0 on the '
                           'inputs seen (agrees).\n'
                           '  Trigger eraser: off, on probation (audit verdict poisoned '
                           "for class 0 (erase_on='flagged'): on probation, the mask must "
                           'be confirmed before it acts; 10 update(s) so far).\n'
                           '  Shuffling Vaccine: off.\n'
                           '  Self-Retrospection: did not run.\n'
                           '  Input-gradient alignment (KDIGA): 48 step(s), last term '
                           '2.17, <t>s.\n'
                           '  Student optimizer steps seen: 48.',
                 'sum': 13.526626623119228,
                 'wsum': -6.929571689888867},
 'default_poisoned': {'report': 'abd-plugin guard report\n'
                                '  Input domain: inputs in [0, 1] (read off the first '
                                'batch: values in [0, 1]).\n'
                                '  Teacher audit: the teacher looks BACKDOORED towards '
                                "class 0 (class 0's maximum margin 74.9, p = 0.0015, "
                                'robust z = 13.6; <t>s).\n'
                                '    How: the margin statistic favours class 0 (p = '
                                '0.0015); the universal blend statistic favours class 0 (z '
                                '= 3.1, p = 0.12); class 0 is the suspect (both favour '
                                'it); its evidence 2 x p = 0.003 is below alpha (0.05): '
                                'poisoned.\n'
                                '    The shuffled-teacher ensemble favours class 0 on the '
                                'inputs seen (agrees).\n'
                                '  Trigger eraser: off, on probation (audit verdict '
                                "poisoned for class 0 (erase_on='flagged'): on probation, "
                                'the mask must be confirmed before it acts; 10 update(s) '
                                'so far).\n'
                                '  Shuffling Vaccine: off.\n'
                                '  Self-Retrospection: did not run.\n'
                                '  Student optimizer steps seen: 48.',
                      'sum': 11.561219758237712,
                      'wsum': -6.095330362887053},
 'default_poisoned_no_probation': {'report': 'abd-plugin guard report\n'
                                             '  Input domain: inputs in [0, 1] (read off '
                                             'the first batch: values in [0, 1]).\n'
                                             '  Teacher audit: the teacher looks '
                                             "BACKDOORED towards class 0 (class 0's "
                                             'maximum margin 74.9, p = 0.0015, robust z = '
                                             '13.6; <t>s).\n'
                                             '    How: the margin statistic favours class '
                                             '0 (p = 0.0015); the universal blend '
                                             'statistic favours class 0 (z = 3.1, p = '
                                             '0.12); class 0 is the suspect (both favour '
                                             'it); its evidence 2 x p = 0.003 is below '
                                             'alpha (0.05): poisoned.\n'
                                             '    The shuffled-teacher ensemble favours '
                                             'class 0 on the inputs seen (agrees).\n'
                                             '  Trigger eraser: ON for class 0 (audit '
                                             "verdict poisoned (erase_on='flagged')). The "
                                             'teacher saw every input with 0 position(s) '
                                             'erased (mask 3.0 % of the input), learned in '
                                             '9 update(s), <t>s.\n'
                                             '    At the last update the erasure moved 100 '
                                             '% of the samples the teacher called class 0 '
                                             '(0 % of the batch) to other classes and kept '
                                             "100 % of the others' classes.\n"
                                             '  Shuffling Vaccine: off.\n'
                                             '  Self-Retrospection: did not run.\n'
                                             '  Student optimizer steps seen: 48.',
                                   'sum': 7.486777883663308,
                                   'wsum': -5.447047219702872},
 'default_poisoned_recheck': {'report': 'abd-plugin guard report\n'
                                        '  Input domain: inputs in [0, 1] (read off the '
                                        'first batch: values in [0, 1]).\n'
                                        '  Teacher audit: the teacher looks BACKDOORED '
                                        "towards class 0 (class 0's maximum margin 74.9, p "
                                        '= 0.0015, robust z = 13.6; <t>s).\n'
                                        '    How: the margin statistic favours class 0 (p '
                                        '= 0.0015); the universal blend statistic favours '
                                        'class 0 (z = 3.1, p = 0.12); class 0 is the '
                                        'suspect (both favour it); its evidence 2 x p = '
                                        '0.003 is below alpha (0.05): poisoned.\n'
                                        '    The shuffled-teacher ensemble favours class 0 '
                                        'on the inputs seen (agrees).\n'
                                        '  Trigger eraser: off, on probation (audit '
                                        'verdict poisoned for class 0 '
                                        "(erase_on='flagged'): on probation, the mask must "
                                        'be confirmed before it acts; 22 update(s) so '
                                        'far).\n'
                                        '  Shuffling Vaccine: off.\n'
                                        '  Self-Retrospection: did not run.\n'
                                        '  Student optimizer steps seen: 48.',
                              'sum': 11.561219758237712,
                              'wsum': -6.095330362887053},
 'forced_clean': {'report': 'abd-plugin guard report\n'
                            '  Input domain: inputs in [0, 1] (read off the first batch: '
                            'values in [0, 1]).\n'
                            "  Teacher audit: no backdoor found (class 7's maximum margin "
                            '0.0927, p = 0.91, robust z = 5.8; <t>s).\n'
                            '    How: the margin statistic favours class 7 (p = 0.91); the '
                            'universal blend statistic favours class 7 (z = 2.7, p = '
                            '0.21); class 7 is the suspect (both favour it); its evidence '
                            '2 x p = 0.43; the margin p reaches clean_alpha (0.5) and the '
                            'universal z is below flag_z (4): clean; the universal patch '
                            'statistic favours class 7 (z = 2.7), below patch_flag_z (7).\n'
                            '    The shuffled-teacher ensemble favours class 7 on the '
                            'inputs seen (agrees).\n'
                            '  Trigger eraser: off, on probation (audit verdict clean for '
                            "class 7 (erase_on='always'): on probation, the mask must be "
                            'confirmed before it acts; 12 update(s) so far).\n'
                            '  Shuffling Vaccine: off.\n'
                            '  Self-Retrospection: did not run.\n'
                            '  Student optimizer steps seen: 48.',
                  'sum': -3.827233434189111,
                  'wsum': -6.646459138325622},
 'paper': {'report': 'abd-plugin guard report\n'
                     '  Input domain: inputs in [0, 1] (read off the first batch: values '
                     'in [0, 1]).\n'
                     '  Teacher audit: not run (audit=False)\n'
                     '  Trigger eraser: off (erase=False).\n'
                     "  SV: on, 4 shuffled layer(s) ['3', '6', '9', '12'], coef 0.1, 24 "
                     'batch(es) seen; suspicious fraction 0.000 over 24 synthesis batches, '
                     '<t>s\n'
                     '  Self-Retrospection: 12 step(s) (window starts at step 36), <t>s.\n'
                     '  Student optimizer steps seen: 48.',
           'sum': 11.671341564273462,
           'wsum': -6.164161027297287},
 'resumed': {'report': 'abd-plugin guard report\n'
                       '  Input domain: inputs in [0, 1] (read off the first batch: values '
                       'in [0, 1]).\n'
                       '  Teacher audit: the teacher looks BACKDOORED towards class 0 '
                       "(class 0's maximum margin 74.9, p = 0.0015, robust z = 13.6; "
                       '<t>s).\n'
                       '    How: the margin statistic favours class 0 (p = 0.0015); the '
                       'universal blend statistic favours class 0 (z = 3.1, p = 0.12); '
                       'class 0 is the suspect (both favour it); its evidence 2 x p = '
                       '0.003 is below alpha (0.05): poisoned.\n'
                       '    The shuffled-teacher ensemble favours class 0 on the inputs '
                       'seen (agrees).\n'
                       '  Trigger eraser: off, on probation (audit verdict poisoned for '
                       "class 0 (erase_on='flagged'): on probation, the mask must be "
                       'confirmed before it acts; 22 update(s) so far).\n'
                       '  Shuffling Vaccine: off.\n'
                       '  Self-Retrospection: did not run.\n'
                       '  Student optimizer steps seen: 48.',
             'sum': 11.561219758237712,
             'wsum': -6.095330362887053}}

#: a second AMD EPYC CPU (2026-12-07, another model: other last bits): the code of ``PINS`` at
#: this release (same scenarios, same reports' wording), every run re-recorded there
_PINS_EPYC_2: dict[str, dict[str, Any]] = {'classic': {'report': 'abd-plugin guard report\n'
                       '  Input domain: inputs in [0, 1] (read off the first '
                       'batch: values in [0, 1]).\n'
                       '  Teacher audit: not run (audit=False)\n'
                       '  Trigger eraser: off (erase=False).\n'
                       '  SV: no vaccine found after 8 shuffle(s) at depth 1, '
                       '5 depth(s) scored first (best tail ratio 0.0000 <= '
                       '0.02) - SV is off; SR is still available; suspicious '
                       'fraction nan over 0 synthesis batches, <t>s\n'
                       '  Self-Retrospection: 18 step(s) (window starts at '
                       'step 30), <t>s.\n'
                       '  Student optimizer steps seen: 48.',
             'sum': 16.682127980311634,
             'wsum': -7.0681184156903125},
 'default_clean': {'report': 'abd-plugin guard report\n'
                             '  Input domain: inputs in [0, 1] (read off the '
                             'first batch: values in [0, 1]).\n'
                             "  Teacher audit: no backdoor found (class 7's "
                             'maximum margin 0.0927, p = 0.91, robust z = 5.8; '
                             '<t>s).\n'
                             '    How: the margin statistic favours class 7 (p '
                             '= 0.91); the universal blend statistic favours '
                             'class 7 (z = 2.7, p = 0.21); class 7 is the '
                             'suspect (both favour it); its evidence 2 x p = '
                             '0.43; the margin p reaches clean_alpha (0.5) and '
                             'the universal z is below flag_z (4): clean; the '
                             'universal patch statistic favours class 7 (z = '
                             '2.7), below patch_flag_z (7).\n'
                             '    The shuffled-teacher ensemble favours class '
                             '7 on the inputs seen (agrees).\n'
                             '  Trigger eraser: off (audit verdict clean '
                             "(erase_on='flagged')).\n"
                             '  Shuffling Vaccine: off.\n'
                             '  Self-Retrospection: did not run.\n'
                             '  Student optimizer steps seen: 48.',
                   'sum': -3.8211911789840087,
                   'wsum': -6.607796630571186},
 'default_iga': {'report': 'abd-plugin guard report\n'
                           '  Input domain: inputs in [0, 1] (read off the '
                           'first batch: values in [0, 1]).\n'
                           '  Teacher audit: the teacher looks BACKDOORED '
                           "towards class 0 (class 0's maximum margin 72.3, p "
                           '= 0.0025, robust z = 15.9; <t>s).\n'
                           '    How: the margin statistic favours class 0 (p = '
                           '0.0025); the universal blend statistic favours '
                           'class 0 (z = 3.0, p = 0.14); class 0 is the '
                           'suspect (both favour it); its evidence 2 x p = '
                           '0.005 is below alpha (0.05): poisoned.\n'
                           '    The shuffled-teacher ensemble favours class 0 '
                           'on the inputs seen (agrees).\n'
                           '  Trigger eraser: off, on probation (audit verdict '
                           "poisoned for class 0 (erase_on='flagged'): on "
                           'probation, the mask must be confirmed before it '
                           'acts; 12 update(s) so far).\n'
                           '  Shuffling Vaccine: off.\n'
                           '  Self-Retrospection: did not run.\n'
                           '  Input-gradient alignment (KDIGA): 48 step(s), '
                           'last term 2.2, <t>s.\n'
                           '  Student optimizer steps seen: 48.',
                 'sum': 7.611639883805765,
                 'wsum': -7.4757940341148625},
 'default_poisoned': {'report': 'abd-plugin guard report\n'
                                '  Input domain: inputs in [0, 1] (read off '
                                'the first batch: values in [0, 1]).\n'
                                '  Teacher audit: the teacher looks BACKDOORED '
                                "towards class 0 (class 0's maximum margin "
                                '72.3, p = 0.0025, robust z = 15.9; <t>s).\n'
                                '    How: the margin statistic favours class 0 '
                                '(p = 0.0025); the universal blend statistic '
                                'favours class 0 (z = 3.0, p = 0.14); class 0 '
                                'is the suspect (both favour it); its evidence '
                                '2 x p = 0.005 is below alpha (0.05): '
                                'poisoned.\n'
                                '    The shuffled-teacher ensemble favours '
                                'class 0 on the inputs seen (agrees).\n'
                                '  Trigger eraser: off, on probation (audit '
                                'verdict poisoned for class 0 '
                                "(erase_on='flagged'): on probation, the mask "
                                'must be confirmed before it acts; 12 '
                                'update(s) so far).\n'
                                '  Shuffling Vaccine: off.\n'
                                '  Self-Retrospection: did not run.\n'
                                '  Student optimizer steps seen: 48.',
                      'sum': 20.469722443522187,
                      'wsum': -7.079477965950749},
 'default_poisoned_no_probation': {'report': 'abd-plugin guard report\n'
                                             '  Input domain: inputs in [0, 1] '
                                             '(read off the first batch: '
                                             'values in [0, 1]).\n'
                                             '  Teacher audit: the teacher '
                                             'looks BACKDOORED towards class 0 '
                                             "(class 0's maximum margin 72.3, "
                                             'p = 0.0025, robust z = 15.9; '
                                             '<t>s).\n'
                                             '    How: the margin statistic '
                                             'favours class 0 (p = 0.0025); '
                                             'the universal blend statistic '
                                             'favours class 0 (z = 3.0, p = '
                                             '0.14); class 0 is the suspect '
                                             '(both favour it); its evidence 2 '
                                             'x p = 0.005 is below alpha '
                                             '(0.05): poisoned.\n'
                                             '    The shuffled-teacher '
                                             'ensemble favours class 0 on the '
                                             'inputs seen (agrees).\n'
                                             '  Trigger eraser: ON for class 0 '
                                             '(audit verdict poisoned '
                                             "(erase_on='flagged')). The "
                                             'teacher saw every input with 0 '
                                             'position(s) erased (mask 3.7 % '
                                             'of the input), learned in 12 '
                                             'update(s), <t>s.\n'
                                             '    At the last update the '
                                             'erasure moved 100 % of the '
                                             'samples the teacher called class '
                                             '0 (25 % of the batch) to other '
                                             'classes and kept 100 % of the '
                                             "others' classes.\n"
                                             '  Shuffling Vaccine: off.\n'
                                             '  Self-Retrospection: did not '
                                             'run.\n'
                                             '  Student optimizer steps seen: '
                                             '48.',
                                   'sum': 17.322618508711457,
                                   'wsum': -7.217250447100147},
 'default_poisoned_recheck': {'report': 'abd-plugin guard report\n'
                                        '  Input domain: inputs in [0, 1] '
                                        '(read off the first batch: values in '
                                        '[0, 1]).\n'
                                        '  Teacher audit: the teacher looks '
                                        "BACKDOORED towards class 0 (class 0's "
                                        'maximum margin 72.3, p = 0.0025, '
                                        'robust z = 15.9; <t>s).\n'
                                        '    How: the margin statistic favours '
                                        'class 0 (p = 0.0025); the universal '
                                        'blend statistic favours class 0 (z = '
                                        '3.0, p = 0.14); class 0 is the '
                                        'suspect (both favour it); its '
                                        'evidence 2 x p = 0.005 is below alpha '
                                        '(0.05): poisoned.\n'
                                        '    The shuffled-teacher ensemble '
                                        'favours class 0 on the inputs seen '
                                        '(agrees).\n'
                                        '  Trigger eraser: off, on probation '
                                        '(audit verdict poisoned for class 0 '
                                        "(erase_on='flagged'): on probation, "
                                        'the mask must be confirmed before it '
                                        'acts; 24 update(s) so far).\n'
                                        '  Shuffling Vaccine: off.\n'
                                        '  Self-Retrospection: did not run.\n'
                                        '  Student optimizer steps seen: 48.',
                              'sum': 20.469722443522187,
                              'wsum': -7.079477965950749},
 'forced_clean': {'report': 'abd-plugin guard report\n'
                            '  Input domain: inputs in [0, 1] (read off the '
                            'first batch: values in [0, 1]).\n'
                            "  Teacher audit: no backdoor found (class 7's "
                            'maximum margin 0.0927, p = 0.91, robust z = 5.8; '
                            '<t>s).\n'
                            '    How: the margin statistic favours class 7 (p '
                            '= 0.91); the universal blend statistic favours '
                            'class 7 (z = 2.7, p = 0.21); class 7 is the '
                            'suspect (both favour it); its evidence 2 x p = '
                            '0.43; the margin p reaches clean_alpha (0.5) and '
                            'the universal z is below flag_z (4): clean; the '
                            'universal patch statistic favours class 7 (z = '
                            '2.7), below patch_flag_z (7).\n'
                            '    The shuffled-teacher ensemble favours class 7 '
                            'on the inputs seen (agrees).\n'
                            '  Trigger eraser: off, on probation (audit '
                            "verdict clean for class 7 (erase_on='always'): on "
                            'probation, the mask must be confirmed before it '
                            'acts; 12 update(s) so far).\n'
                            '  Shuffling Vaccine: off.\n'
                            '  Self-Retrospection: did not run.\n'
                            '  Student optimizer steps seen: 48.',
                  'sum': -3.8211911789840087,
                  'wsum': -6.607796630571186},
 'paper': {'report': 'abd-plugin guard report\n'
                     '  Input domain: inputs in [0, 1] (read off the first '
                     'batch: values in [0, 1]).\n'
                     '  Teacher audit: not run (audit=False)\n'
                     '  Trigger eraser: off (erase=False).\n'
                     "  SV: on, 4 shuffled layer(s) ['3', '6', '9', '12'], "
                     'coef 0.1, 24 batch(es) seen; suspicious fraction 0.000 '
                     'over 24 synthesis batches, <t>s\n'
                     '  Self-Retrospection: 12 step(s) (window starts at step '
                     '36), <t>s.\n'
                     '  Student optimizer steps seen: 48.',
           'sum': 20.40765241572808,
           'wsum': -7.210000326915848},
 'resumed': {'report': 'abd-plugin guard report\n'
                       '  Input domain: inputs in [0, 1] (read off the first '
                       'batch: values in [0, 1]).\n'
                       '  Teacher audit: the teacher looks BACKDOORED towards '
                       "class 0 (class 0's maximum margin 72.3, p = 0.0025, "
                       'robust z = 15.9; <t>s).\n'
                       '    How: the margin statistic favours class 0 (p = '
                       '0.0025); the universal blend statistic favours class 0 '
                       '(z = 3.0, p = 0.14); class 0 is the suspect (both '
                       'favour it); its evidence 2 x p = 0.005 is below alpha '
                       '(0.05): poisoned.\n'
                       '    The shuffled-teacher ensemble favours class 0 on '
                       'the inputs seen (agrees).\n'
                       '  Trigger eraser: off, on probation (audit verdict '
                       "poisoned for class 0 (erase_on='flagged'): on "
                       'probation, the mask must be confirmed before it acts; '
                       '24 update(s) so far).\n'
                       '  Shuffling Vaccine: off.\n'
                       '  Self-Retrospection: did not run.\n'
                       '  Student optimizer steps seen: 48.',
             'sum': 20.469722443522187,
             'wsum': -7.079477965950749}}

PINS_BY_MACHINE: dict[str, dict[str, dict[str, Any]]] = {
    '93.83131691552853': _PINS_EPYC, '92.045833675219': _PINS_EPYC_2}


def _machine() -> str:
    """The floating-point machine, as the pins see it: the float64 sum of the poisoned fixture
    teacher's parameters (trained single-threaded by plain torch code, nothing of abd_plugin),
    printed exactly. Another CPU (vector units, libm) changes it, and with it every pin: a
    24-iteration run amplifies the last bits into different audit margins and, for ``classic``,
    into a different vaccine decision."""
    teacher = _poisoned_digits_cnn()[0]
    return repr(float(sum(p.detach().double().sum() for p in teacher.parameters())))


@functools.cache
def _result(name: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    return SCENARIOS[name]()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_pinned_behaviour(name: str) -> None:
    """Exact on a machine the pins were recorded on: ``PINS_BY_MACHINE`` when this machine's
    fingerprint is there, else ``PINS`` (the first recording machine, whose fingerprint was not
    kept)."""
    got = _result(name)
    want = PINS_BY_MACHINE.get(_machine(), PINS)[name]
    assert got["report"] == want["report"]
    # exact on the recording machine; the tolerance only absorbs a last bit here and there
    assert got["sum"] == pytest.approx(want["sum"], rel=1e-4, abs=1e-5)
    assert got["wsum"] == pytest.approx(want["wsum"], rel=1e-4, abs=1e-5)


#: scenario pairs whose students must be bit-identical on any machine
SAME_STUDENT = [
    ("resumed", "default_poisoned_recheck", "a run saved and resumed halfway equals one run"),
    ("forced_clean", "default_clean",
     "a mask forced on a clean teacher waits on probation, unconfirmed: the run is unchanged"),
    ("default_poisoned_recheck", "default_poisoned",
     "re-audits on probation read the teacher, they never change the student"),
]


@pytest.mark.parametrize("a,b,why", SAME_STUDENT)
def test_pinned_scenarios_agree_on_any_machine(a: str, b: str, why: str) -> None:
    """Relations between the pinned runs that hold whatever the CPU (the pins themselves hold
    only where they were recorded)."""
    ra, rb = _result(a), _result(b)
    assert (ra["sum"], ra["wsum"]) == (rb["sum"], rb["wsum"]), why


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_pinned_verdicts_on_any_machine(name: str) -> None:
    """The audit's verdict in every pinned report, whatever the CPU."""
    report = _result(name)["report"]
    if name in ("classic", "paper"):  # the paper's configurations: no audit
        assert "Teacher audit: not run" in report
    elif "clean" in name:
        assert "Teacher audit: no backdoor found" in report
    else:
        assert "Teacher audit: the teacher looks BACKDOORED towards class 0" in report


if __name__ == "__main__":  # print this machine's fingerprint and pins from the current code
    torch.set_num_threads(1)
    out = {name: SCENARIOS[name]() for name in sorted(SCENARIOS)}
    print(f"machine {_machine()}")
    print("pins = " + repr(out))
