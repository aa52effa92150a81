"""ABDConfig: every field is declared with a spec (what it accepts) and a meaning (what help()
shows); bad values raise a TypeError/ValueError naming the field and its range."""
from __future__ import annotations

import dataclasses
import pydoc
from dataclasses import dataclass

import pytest

from abd_plugin import ABDConfig
from abd_plugin.validation import Int, field_specs, spec

SPECS = field_specs(ABDConfig)


def test_help_shows_what_every_field_means_and_accepts():
    text = pydoc.render_doc(ABDConfig, renderer=pydoc.plaintext)
    for f in dataclasses.fields(ABDConfig):
        check, doc = SPECS[f.name]
        first = doc.strip().splitlines()[0].strip()
        assert f"{f.name} = {f.default!r}" in text, f.name
        assert first in text, f.name
        assert f"accepts {check.describe()}" in text, f.name


def test_a_field_declared_without_a_spec_is_refused_at_class_definition():
    @dataclass(frozen=True)
    class Grown:
        a: int = spec(1, Int(0), "documented")
        b: float = 0.5  # added the old way

    with pytest.raises(TypeError, match=r"Grown\.b is declared without a spec"):
        field_specs(Grown)


@pytest.mark.parametrize("field,value,exc,accepted", [
    ("sr", "no", TypeError, "True or False"),
    ("sv", 1, TypeError, "True or False"),
    ("sr_scale", float("nan"), ValueError, "finite number in [0, 10000]"),
    ("sv_coef", float("inf"), ValueError, "finite number in [0, 10000]"),
    ("sr_temperature", 0, ValueError, "in [0.01, 100]"),
    ("total_steps", -5, ValueError, "None or an integer >= 1"),
    ("tail_ratio_threshold", 5, ValueError, "in [-1, 1)"),
    ("n_shuffle_models", 2.5, TypeError, "an integer in [1, 1024]"),
    ("n_shuffle_models", True, TypeError, "an integer"),
    ("seed", "abc", TypeError, "an integer in [0, "),
    ("sr_outer_portion", 0.0, ValueError, "in (0, 1]"),
    ("sv_target_fraction", 1.0, ValueError, "in (0, 1)"),
    ("sr_start_fraction", 1.5, ValueError, "None or a finite number in [0, 1]"),
    ("shuffle_layers", True, TypeError, "'auto', an integer >= 1"),
    ("shuffle_layers", "last", ValueError, "'auto', an integer >= 1"),
    ("shuffle_layers", [], ValueError, "non-empty list"),
    ("sv_coef_bounds", (5.0, 1.0), ValueError, "low <= high"),
    ("sv_coef_bounds", 3.0, TypeError, "a pair (low, high)"),
    ("sr_pert_model", "nobody", ValueError, "one of 'teacher', 'student'"),
    ("logits_fn", "logits", TypeError, "None or a callable"),
    ("sv_reweight_cap", 0, ValueError, "> 0"),
])
def test_bad_values_name_the_field_and_what_it_accepts(field, value, exc, accepted):
    with pytest.raises(exc) as err:
        ABDConfig(**{field: value})
    msg = str(err.value)
    assert f"ABDConfig.{field} must be" in msg and accepted in msg and repr(value) in msg
    with pytest.raises(exc):  # every way of making a config checks
        ABDConfig().replace(**{field: value})


def test_valid_edge_values_and_the_recipes_pass():
    ABDConfig(sv_coef=0, sr_start_fraction=1, seed=2**63 - 2, shuffle_layers=["a", "b"],
              sv_coef_bounds=[1, 1], tail_ratio_threshold=-1.0, logits_fn=lambda o: o[0])
    ABDConfig.paper()
    ABDConfig.tuned(sr_start_fraction=0.5)
    import numpy as np

    assert ABDConfig(n_shuffle_models=np.int64(2), sv_coef=np.float32(0.5)).n_shuffle_models == 2
