"""Property tests of the policy dataclass and its presets (tcpade_fx.policy)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tcpade_fx
from tcpade_fx import PRESET_AIMS, PRESETS, Policy
from tcpade_fx.pade import needed_nodes
from tcpade_fx.policy import resolve_policy

FAST = settings(max_examples=80, deadline=None)
NAMED = ("quality", "balanced", "fast")


def test_presets_exist_validate_and_state_their_aim():
    for name in NAMED + ("full",):
        p = Policy.preset(name)
        assert isinstance(p, Policy) and p.name == name and p is PRESETS[name]
        fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
        assert Policy(**fields) == p  # the preset passes validation when rebuilt
        assert 0.0 < PRESET_AIMS[name] <= 1.0
        assert resolve_policy(name) is p and resolve_policy(p) is p
    assert set(PRESET_AIMS) == set(PRESETS)
    q, b, f = (PRESETS[n] for n in NAMED)
    assert q.mid_tolerance <= b.mid_tolerance <= f.mid_tolerance
    assert q.mid_max_skip <= b.mid_max_skip <= f.mid_max_skip


@FAST
@given(steps=st.integers(12, 60), error=st.floats(0.0, 10.0))
def test_presets_compute_what_their_aims_state_in_that_order(steps, error):
    """Each preset's controller over a trajectory whose checked errors are ``error``: it never computes more than
    ceil(aim * N) steps, spends exactly that once the errors are not negligible, and the names order quality above
    speed (full > quality > balanced > fast computed steps)."""
    from tcpade_fx.testing import drive_controller

    computed = {}
    for name in ("full",) + NAMED:
        computed[name] = drive_controller(PRESETS[name], steps, error).computed
        budget = math.ceil(PRESET_AIMS[name] * steps)
        assert computed[name] <= budget, (name, computed[name], budget)
        if error >= 0.2:
            assert computed[name] == budget, (name, computed[name], budget)
    assert computed["full"] > computed["quality"] > computed["balanced"] > computed["fast"], computed


@FAST
@given(name=st.text(max_size=20))
def test_unknown_preset_error_lists_the_valid_names(name):
    if name in PRESETS:
        return
    with pytest.raises(ValueError) as info:
        Policy.preset(name)
    msg = str(info.value)
    assert repr(name) in msg
    for valid in PRESETS:
        assert repr(valid) in msg


def test_resolve_policy_rejects_other_types():
    for bad in (None, 3, 1.5, ["fast"]):
        with pytest.raises(TypeError):
            resolve_policy(bad)


# Each field with values outside its range (strategies, not hand-picked points).
BAD_VALUES = {
    "method": st.text(max_size=8).filter(lambda s: s not in ("pade", "taylor", "reuse")),
    "schedule": st.text(max_size=8).filter(lambda s: s not in ("adaptive", "fixed", "explicit")),
    "order": st.integers(3, 100) | st.integers(-100, -1) | st.floats(0.5, 1.5),
    "late_order": st.integers(3, 100) | st.integers(-100, -1),
    "history_size": st.integers(5, 100) | st.integers(-100, 0),
    "mid_max_skip": st.integers(-100, -1) | st.floats(0.5, 3.5),
    "late_max_skip": st.integers(3, 100) | st.integers(-100, -1),
    "interval": st.integers(-100, 0),
    "eps": st.floats(-1e3, -1e-12) | st.just(math.inf) | st.just(math.nan),
    "mid_tolerance": st.floats(-1e3, -1e-12) | st.just(math.inf) | st.just(math.nan),
    "late_tolerance": st.floats(-1e3, -1e-12) | st.just(math.inf),
    "pole_margin": st.floats(1.0001, 1e3) | st.floats(-1e3, -1e-9),
    "lambda_min": st.floats(1.0001, 1e3) | st.floats(-1e3, -1e-9),
    "error_smoothing": st.floats(1.0001, 1e3) | st.floats(-1e3, -1e-9),
    "early_end": st.floats(1.0001, 1e3) | st.floats(-1e3, -1e-9),
    "late_start": st.floats(1.0001, 1e3) | st.floats(-1e3, -1e-9),
    "rise_factor": st.floats(-1e3, 0.9999),
    "compute_budget": st.floats(1.0001, 1e3) | st.floats(-1e3, 0.0),
}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), field=st.sampled_from(sorted(BAD_VALUES)), base=st.sampled_from(NAMED))
def test_each_out_of_range_field_raises_value_error_naming_it(data, field, base):
    value = data.draw(BAD_VALUES[field])
    with pytest.raises(ValueError) as info:
        PRESETS[base].replace(**{field: value})
    assert f"{field}=" in str(info.value)


@FAST
@given(early=st.floats(0.0, 1.0), late=st.floats(0.0, 1.0))
def test_stage_boundaries_must_be_ordered(early, late):
    if early <= late:
        assert Policy(early_end=early, late_start=late).early_end == early
    else:
        with pytest.raises(ValueError, match="early_end"):
            Policy(early_end=early, late_start=late)


@FAST
@given(method=st.sampled_from(["pade", "taylor", "reuse"]), order=st.integers(0, 2), late_order=st.integers(0, 2),
       history_size=st.integers(1, 4))
def test_a_history_too_short_for_the_order_is_refused_not_silently_lowered(method, order, late_order, history_size):
    need = needed_nodes(method, max(order, late_order))
    kwargs = dict(method=method, order=order, late_order=late_order, history_size=history_size)
    if history_size >= need:
        assert Policy(**kwargs).history_size == history_size
    else:
        with pytest.raises(ValueError, match=f"history_size={history_size} keeps too few .* needs {need}"):
            Policy(**kwargs)


@st.composite
def valid_policies(draw):
    early = draw(st.floats(0.0, 1.0))
    method = draw(st.sampled_from(["pade", "taylor", "reuse"]))
    order, late_order = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    return dict(
        method=method,
        order=order,
        late_order=late_order,
        history_size=draw(st.integers(needed_nodes(method, max(order, late_order)), 4)),
        per_sample=draw(st.booleans()),
        eps=draw(st.floats(0.0, 1.0)),
        pole_margin=draw(st.floats(0.0, 1.0)),
        lambda_min=draw(st.floats(0.0, 1.0)),
        rise_factor=draw(st.floats(1.0, 1e3)),
        error_smoothing=draw(st.floats(0.0, 1.0)),
        early_end=early,
        late_start=draw(st.floats(early, 1.0)),
        mid_tolerance=draw(st.floats(0.0, 1e3)),
        late_tolerance=draw(st.floats(0.0, 1e3)),
        mid_max_skip=draw(st.integers(0, 50)),
        late_max_skip=draw(st.integers(0, 2)),
        compute_last_step=draw(st.booleans()),
        compute_budget=draw(st.none() | st.floats(1e-6, 1.0)),
        schedule=draw(st.sampled_from(["adaptive", "fixed"])),
        interval=draw(st.integers(1, 50)),
    )


@FAST
@given(fields=valid_policies())
def test_every_in_range_policy_is_accepted_and_frozen(fields):
    p = Policy(**fields)
    for k, v in fields.items():
        assert getattr(p, k) == v
    for name in fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, name, fields[name])
    q = p.replace(mid_tolerance=p.mid_tolerance)
    assert q == p and q is not p and q.name == "custom"


def test_preset_prints_from_a_fresh_interpreter():
    out = subprocess.run(
        [sys.executable, "-c", "import tcpade_fx; print(tcpade_fx.Policy.preset('balanced'))"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert out.startswith("Policy(") and "name='balanced'" in out
    assert repr(tcpade_fx.Policy.preset("balanced")) == out.strip()
