"""The arrival schedule of each profile (pure arithmetic, no clock)."""

from __future__ import annotations

import numpy as np
import pytest

from fraudactors.errors import ConfigError
from loadgen.schedule import make_profile, scheduled_times


def test_constant_profile_spaces_arrivals_evenly() -> None:
    p = make_profile("constant", 1000, 2.0)
    t = scheduled_times(p)
    assert p.total == 2000
    np.testing.assert_allclose(t, np.arange(2000) / 1000.0)
    assert p.count_due(0.0) == 1  # transaction 0 is due at t = 0
    assert p.count_due(0.0105) == 11
    assert p.count_due(5.0) == 2000


def test_ramp_profile_integrates_a_linear_rate() -> None:
    p = make_profile("ramp", 1000, 10.0, rate_to=10_000)
    assert p.total == 55_000  # (1000 + 10000) / 2 * 10
    t = scheduled_times(p)
    assert np.all(np.diff(t) > 0)
    # the gap between arrivals shrinks as the rate rises: 1/r(t)
    assert np.diff(t[:2])[0] == pytest.approx(1 / 1000, rel=1e-3)
    assert np.diff(t[-2:])[0] == pytest.approx(1 / 10_000, rel=1e-2)
    # the first second carries 1000 + 900/2 arrivals
    assert int(np.searchsorted(t, 1.0, side="left")) == 1450
    assert p.rate_at(5.0) == pytest.approx(5500)


def test_step_profile_holds_each_rate_for_its_share_of_the_run() -> None:
    p = make_profile("step", 1000, 8.0, rate_to=4000, steps=4)
    assert [s.rate_from for s in p.segments] == [1000, 2000, 3000, 4000]
    assert p.total == 2 * (1000 + 2000 + 3000 + 4000)
    t = scheduled_times(p)
    counts = np.histogram(t, bins=[0, 2, 4, 6, 8])[0]
    assert counts.tolist() == [2000, 4000, 6000, 8000]


@pytest.mark.parametrize("name", ["constant", "step", "ramp"])
def test_vectorized_schedule_matches_the_scalar_inverse(name: str) -> None:
    p = make_profile(name, 300, 3.0, rate_to=900, steps=3)
    t = scheduled_times(p)
    for i in range(0, p.total, 37):
        assert t[i] == pytest.approx(p.scheduled_time(i), abs=1e-9)
        assert p.count_due(t[i]) >= i + 1
    assert t[-1] <= p.duration_s


@pytest.mark.parametrize(("name", "rate", "duration", "key"), [
    ("constant", 0, 1, "loadgen.rate"), ("constant", 10, -1, "loadgen.duration"),
    ("zigzag", 10, 1, "loadgen.profile"), ("ramp", 10, 1, "loadgen.rate_to"),
    ("constant", 0.5, 1, "loadgen.rate"),  # no transaction at all
])
def test_bad_profiles_are_refused_with_the_key(name: str, rate: float, duration: float, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_profile(name, rate, duration, rate_to=-5 if key == "loadgen.rate_to" else None)
    assert err.value.key == key
