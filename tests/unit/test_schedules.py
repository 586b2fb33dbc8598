import math
import pickle

import pytest

from holderpo_megatron.algorithms import SCHEDULE_KINDS, PSchedule

INCREASING = {"linear", "sin", "quad", "cubic"}
DECREASING = {"linear_dec", "cos", "quad_dec", "cubic_dec"}


def test_every_kind_is_classified():
    assert set(SCHEDULE_KINDS) == INCREASING | DECREASING | {"constant"}


@pytest.mark.parametrize("kind", sorted(INCREASING | DECREASING))
def test_endpoints_and_monotone(kind):
    s = PSchedule(kind, p_min=-1.0, p_max=2.0, schedule_steps=100, power=3)
    start, end = (-1.0, 2.0) if kind in INCREASING else (2.0, -1.0)
    assert s.value(0) == pytest.approx(start, abs=1e-12)
    assert s.value(100) == pytest.approx(end, abs=1e-12)
    assert s.value(10_000) == pytest.approx(end, abs=1e-12)  # held after schedule_steps
    vals = [s.value(i) for i in range(101)]
    sign = 1 if kind in INCREASING else -1
    assert all(sign * (b - a) >= -1e-12 for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("kind,mid", [
    ("linear", 0.5), ("linear_dec", 0.5), ("sin", 0.5), ("cos", 0.5), ("cubic", 0.5), ("cubic_dec", 0.5),
    ("quad", -1.0 + 3.0 * 0.5**2), ("quad_dec", 2.0 - 3.0 * 0.5**2),
])
def test_midpoints(kind, mid):
    s = PSchedule(kind, p_min=-1.0, p_max=2.0, schedule_steps=10, power=2)
    assert s.value(5) == pytest.approx(mid, abs=1e-12)


def test_formulas_at_a_quarter():
    lo, hi, x = -2.0, 2.0, 0.25
    mid, amp = 0.0, 2.0
    expect = {
        "sin": mid - amp * math.cos(math.pi * x), "cos": mid + amp * math.cos(math.pi * x),
        "cubic": mid + amp * (2 * x - 1) ** 3, "cubic_dec": mid - amp * (2 * x - 1) ** 3,
        "linear": lo + 4 * x, "linear_dec": hi - 4 * x, "quad": lo + 4 * x**2, "quad_dec": hi - 4 * x**2,
    }
    for kind, v in expect.items():
        assert PSchedule(kind, lo, hi, 100, 2).value(25) == pytest.approx(v, abs=1e-12), kind


def test_constant_and_pickle_and_metrics():
    s = PSchedule("constant", p_min=0.0, p_max=1.5, schedule_steps=10)
    assert s.value(0) == s.value(99) == 1.5
    s2 = pickle.loads(pickle.dumps(PSchedule("linear_dec", -1, 2, 500)))
    assert s2 == PSchedule("linear_dec", -1, 2, 500) and s2.value(250) == pytest.approx(0.5)
    m = s2.metrics(250)
    assert m["p"] == pytest.approx(0.5) and m["p_schedule"] == "linear_dec"


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "exp"}, "schedule kind must be one of"),
    ({"p_min": 3.0, "p_max": 1.0}, "p_min"),
    ({"schedule_steps": 0}, "schedule_steps"),
    ({"power": 0}, "power"),
    ({"p_max": float("inf")}, "p_max must be a finite"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSchedule(**kwargs)
    with pytest.raises(ValueError, match="step must be"):
        PSchedule().value(-1)
