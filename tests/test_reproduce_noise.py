"""The shared rules of ``xbt reproduce`` on made-up numbers: the 95% interval of a mean over
seeds (checked against values worked out by hand from Student's t), the sign and tolerance
tests with their inconclusive outcome (ties included), the tolerance from serial's seed spread,
and how checks combine into one verdict."""
import math

import pytest

from xbraid_transformers.app.reproduce.base import (CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE,
                                                    Spread, combine, seed_tolerance, sign, within)


def test_spread_is_the_t_interval_of_the_mean():
    # mean 2, sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    spread = Spread.of([1.0, 2.0, 3.0])
    assert spread.mean == 2.0 and spread.sd == 1.0
    assert spread.low == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-12)
    assert spread.high == pytest.approx(2 + 4.303 / math.sqrt(3), abs=1e-12)
    # five values 10, 12, 14, 16, 18: mean 14, sd sqrt(10), t(0.975, 4) = 2.776
    spread = Spread.of([10, 12, 14, 16, 18])
    assert spread.high - spread.mean == pytest.approx(2.776 * math.sqrt(10) / math.sqrt(5))
    # 40 values: the normal quantile
    values = [float(i % 2) for i in range(40)]
    assert Spread.of(values).high - 0.5 == pytest.approx(1.96 * Spread.of(values).sd / math.sqrt(40))


def test_spread_of_one_value_or_none_has_no_interval():
    one = Spread.of([0.25, None, math.nan])
    assert one.values == (0.25,) and math.isnan(one.low) and "1 seed" in str(one)
    assert math.isnan(Spread.of([]).mean)
    assert str(Spread.of([1.0, 2.0, 3.0])).startswith("2 [")


@pytest.mark.parametrize("differences, expected", [
    ([1.0, 1.1, 0.9], True),            # clearly above zero
    ([-1.0, -1.1, -0.9], False),        # clearly below
    ([1.0, -1.0, 0.5], INCONCLUSIVE),   # the interval holds zero
    ([0.0, 0.0, 0.0], INCONCLUSIVE),    # a tie
    ([0.5], INCONCLUSIVE),              # one seed: no noise estimate
])
def test_sign(differences, expected):
    assert sign(differences) == expected


@pytest.mark.parametrize("differences, tolerance, expected", [
    ([0.01, -0.02, 0.0], 0.05, True),        # the whole interval within the tolerance
    ([0.0, 0.0, 0.0], 0.0, True),            # a tie is within any tolerance
    ([0.30, 0.31, 0.29], 0.05, False),       # a real difference beyond the tolerance
    ([-0.30, -0.31, -0.29], 0.05, False),    # ... on either side
    ([0.9, -0.5, 0.4], 0.05, INCONCLUSIVE),  # beyond the tolerance, but within the noise
    ([0.04, -0.04, 0.0], 0.05, INCONCLUSIVE),  # the mean within, its interval not: not shown
    ([0.01], 0.05, INCONCLUSIVE),            # one seed: no noise estimate
])
def test_within(differences, tolerance, expected):
    assert within(differences, tolerance) == expected


def test_seed_tolerance_is_twice_serial_spread_with_a_floor():
    assert seed_tolerance([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert seed_tolerance([1.0, 1.0, 1.0], floor=0.1) == 0.1
    assert seed_tolerance([5.0], floor=0.2) == 0.2


@pytest.mark.parametrize("checks, expected", [
    ([True, True], CONFIRMED),
    ([True, False, None, INCONCLUSIVE], CONTRADICTED),
    ([True, None, INCONCLUSIVE], NOT_MEASURABLE),
    ([True, INCONCLUSIVE], INCONCLUSIVE),
])
def test_combine(checks, expected):
    assert combine(checks) == expected
