"""ABDConfig: every field is declared with a spec (what it accepts) and a meaning (what help()
shows); bad values raise a TypeError/ValueError naming the field and its range; and, property
based, any mix of field values either is refused that way or gives a run with finite numbers."""
from __future__ import annotations

import dataclasses
import math
import pydoc
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from abd_plugin import ABDConfig, ABDGuard
from abd_plugin.config import FLAT, SECTIONS
from abd_plugin.vaccine import Layers
from abd_plugin.validation import (
    Bool,
    Choice,
    Int,
    IsCallable,
    Num,
    NumPair,
    Optional,
    Spec,
    field_specs,
    spec,
)
from abd_testutils import TinyGenerator, make_pair

GENERAL = [f.name for f in dataclasses.fields(ABDConfig) if f.name not in SECTIONS]
#: every keyword ABDConfig takes besides the section objects: the general fields and the flat
#: keywords of every section's fields
SPECS = {name: field_specs(ABDConfig)[name] for name in GENERAL}
SPECS.update({flat: field_specs(SECTIONS[attr])[name] for flat, (attr, name) in FLAT.items()})


def test_help_shows_what_every_field_means_and_accepts():
    text = pydoc.render_doc(ABDConfig, renderer=pydoc.plaintext)
    for name in GENERAL:
        check, doc = SPECS[name]
        assert f"{name} = {getattr(ABDConfig(), name)!r}" in text, name
        assert doc.strip().splitlines()[0].strip() in text, name
        assert f"accepts {check.describe()}" in text, name
    for attr, cls in SECTIONS.items():
        assert f"Section {attr} = {cls.__name__}(...)" in text, attr
        flat = {name: key for key, name in cls.flat_names().items()}
        for f in dataclasses.fields(cls):
            check, doc = field_specs(cls)[f.name]
            head = f"{attr}.{f.name} = {f.default!r}    (flat keyword: {flat[f.name]})"
            assert head in text, head
            assert doc.strip().splitlines()[0].strip() in text, f.name
            assert f"accepts {check.describe()}" in text, f.name


def test_sections_and_flat_keywords_are_one_config():
    from abd_plugin.audit import AuditSettings
    from abd_plugin.eraser import EraseSettings

    a = ABDConfig(erase=EraseSettings(price=1.0), audit=AuditSettings(steps=20), sv=True)
    b = ABDConfig(erase_price=1.0, audit_steps=20, vaccine={"enabled": True})
    assert a == b and a.erase.price == a.erase_price == 1.0 and a.vaccine.enabled and a.sv
    # a bool is the section's switch, and replace keeps the section's other fields
    c = b.replace(audit=False)
    assert not c.audit.enabled and c.audit.steps == 20 and c.erase.price == 1.0
    assert c.replace(erase={"keep_weight": 0.5}).erase_keep == 0.5
    with pytest.raises(TypeError, match="unknown ABDConfig field"):
        ABDConfig(erase_pricee=1.0)
    with pytest.raises(TypeError, match="ABDConfig.audit must be a AuditSettings"):
        ABDConfig(audit="yes")
    # a rule between two fields is the section's, named as the caller named the fields
    with pytest.raises(ValueError, match=r"ABDConfig\(audit_clean_alpha\).*must be >= alpha"):
        ABDConfig(audit_clean_alpha=0.01)
    with pytest.raises(ValueError, match="clean_alpha .* must be >= alpha"):
        AuditSettings(clean_alpha=0.01)


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


# ------------------------------------------------------------------ property-based
GARBAGE = [float("nan"), float("inf"), -float("inf"), -1, -1.5, 0, 0.0, 2.5, 10**12, 1e300, "abc",
           "", None, True, False, [], [1], (1, 2, 3), {}, object()]


def _valid(check: Spec) -> st.SearchStrategy:
    """Values ``check`` accepts, small enough for a CI run, edges included."""
    if isinstance(check, Bool):
        return st.booleans()
    if isinstance(check, Optional):
        return st.one_of(st.none(), _valid(check.inner))
    if isinstance(check, Choice):
        return st.sampled_from(check.values)
    if isinstance(check, IsCallable):
        return st.just(lambda out: out)
    if isinstance(check, Layers):
        return st.sampled_from(["auto", 1, 2, 7, ["conv3"], ("conv2", "fc")])
    if isinstance(check, NumPair):
        return st.tuples(st.floats(1e-3, 10.0), st.floats(0, 100.0)).map(
            lambda t: (t[0], t[0] + t[1]))
    if isinstance(check, Int):
        lo = check.lo if check.lo is not None else 0
        edges = [lo] + ([check.hi] if check.hi is not None and check.hi <= 1024 else [])
        return st.one_of(st.sampled_from(edges), st.integers(lo, lo + 3))
    if isinstance(check, Num):
        lo = check.lo if check.lo is not None else -1e3
        hi = check.hi if check.hi is not None else lo + 1e3
        edges = ([] if check.lo_open else [lo]) + ([] if check.hi_open else [hi])
        inner = st.floats(lo, min(hi, lo + 2.0), exclude_min=check.lo_open,
                          exclude_max=check.hi_open or hi <= lo + 2.0 and check.hi_open)
        return st.one_of(st.sampled_from(edges), inner) if edges else inner
    raise AssertionError(f"no strategy for {check!r}")


def _value(name: str) -> st.SearchStrategy:
    return st.one_of(_valid(SPECS[name][0]), st.sampled_from(GARBAGE))


@st.composite
def config_kwargs(draw):
    names = draw(st.permutations(sorted(SPECS)))[: draw(st.integers(1, 6))]
    return {n: draw(_value(n)) for n in names}


def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def _tiny_run(cfg: ABDConfig) -> dict:
    """Two ZSKT-style iterations (generator step, student step) under the guard."""
    torch.manual_seed(0)
    teacher, student = make_pair()
    gen = TinyGenerator()
    og = torch.optim.Adam(gen.parameters(), 1e-2)
    os_ = torch.optim.Adam(student.parameters(), 1e-2)

    def kl(t, s):
        return torch.nn.functional.kl_div(torch.log_softmax(s, 1), torch.log_softmax(t, 1),
                                          reduction="batchmean", log_target=True)

    with ABDGuard(teacher, student, config=cfg.replace(total_steps=cfg.total_steps or 2)) as g:
        for _ in range(2):
            z = torch.randn(8, gen.z_dim)
            x = gen(z)
            loss_g = -kl(teacher(x), student(x))
            og.zero_grad()
            loss_g.backward()
            og.step()
            xs = gen(z).detach()
            with torch.no_grad():
                t = teacher(xs)
            loss_s = kl(t, student(xs))
            os_.zero_grad()
            loss_s.backward()
            os_.step()
            assert math.isfinite(loss_g.item()) and math.isfinite(loss_s.item())
    for p in list(student.parameters()) + list(gen.parameters()):
        assert torch.isfinite(p).all()
    rep = g.report()
    out = {"sv_calls": 0, "sr_steps": 0}
    for rec in rep.records.values():
        d = rec.as_dict()
        no_data = {  # NaN means "no data" there, by contract
            "suspicious_fraction": d.get("calls") == 0,
            "last_suspicious_fraction": True,
            "flip": d.get("updates") == 0, "kept": d.get("updates") == 0,
            "target_fraction": d.get("status") != "on", "price": d.get("status") != "on",
            "last_loss": d.get("steps") == 0, "scale": d.get("rescaled") == 0,
        }
        for k, v in d.items():
            if not no_data.get(k):
                assert _finite(v), (d["kind"], k, v)
        if d["kind"] == "VaccineReport":
            out["sv_calls"] = d["calls"]
        if d["kind"] == "RetrospectionReport":
            out["sr_steps"] = d["steps"]
    return out


#: the drawn fields go on top of a config where SV, SR, the audit and (when the audit flags the
#: tiny teacher, or a target is drawn) the eraser all act within two iterations
BUSY = dict(sv=True, sr=True, verify=False, shuffle_layers=1, sr_start_step=0, sr_inner_rounds=2,
            audit_steps=3, audit_starts=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=config_kwargs())
def test_any_field_values_give_a_clean_error_or_a_finite_run(kw):
    try:
        cfg = ABDConfig(**{**BUSY, **kw})
    except (TypeError, ValueError) as err:
        msg = str(err)
        named = [n for n in kw if f"ABDConfig.{n} " in msg or n in msg]
        assert named, (kw, msg)
        assert "must be" in msg or "not both" in msg, msg
        event(f"config refused: {type(err).__name__}")
        return
    rep = _tiny_run(cfg)
    event(f"config accepted: ran (SV {'on' if rep['sv_calls'] else 'off'}, SR "
          f"{'on' if rep['sr_steps'] else 'off'})")


def test_a_defense_given_the_whole_config_names_its_section():
    from abd_plugin import SelfRetrospection, ShufflingVaccine
    from abd_plugin.eraser import TriggerEraser
    from abd_testutils import make_pair

    teacher, student = make_pair()
    with pytest.raises(TypeError, match=r"takes a VaccineSettings, got ABDConfig; pass its "
                                        r"section, ShufflingVaccine\(\.\.\., config\.vaccine"):
        ShufflingVaccine(teacher, ABDConfig())
    with pytest.raises(TypeError, match=r"config\.retrospection"):
        SelfRetrospection(student, teacher, ABDConfig())
    with pytest.raises(TypeError, match=r"config\.erase"):
        TriggerEraser(teacher, ABDConfig())
