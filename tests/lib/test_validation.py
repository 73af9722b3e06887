"""The argument checks every message of the library goes through."""

import math

import pytest

from optim_callbacks.validation import (
    check_betas,
    check_in_range,
    check_non_negative,
    check_positive,
)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused_by_every_numeric_check(value):
    with pytest.raises(ValueError, match=rf"lr: got {value!r}; allowed: a finite number > 0"):
        check_positive("lr", value)
    with pytest.raises(ValueError, match=rf"wd: got {value!r}; allowed: a finite number >= 0"):
        check_non_negative("wd", value)
    with pytest.raises(ValueError, match=rf"ratio: got {value!r}; allowed: a number in \[0, 1\]"):
        check_in_range("ratio", value, 0, 1, high_inclusive=True)
    with pytest.raises(ValueError, match=r"x: got .*; allowed: a finite number in \[0, inf\]"):
        check_in_range("x", value, 0, math.inf, high_inclusive=True)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        check_betas("betas", (value, 0.9))


@pytest.mark.parametrize("value", [True, "1", None, [1.0]])
def test_non_numbers_are_refused(value):
    for check in (check_positive, check_non_negative):
        with pytest.raises(ValueError, match=r"p: got "):
            check("p", value)


def test_finite_numbers_in_range_pass_and_come_back():
    assert check_positive("lr", 1e-3) == 1e-3
    assert check_positive("lr", 1e300) == 1e300
    assert check_non_negative("wd", 0) == 0
    assert check_in_range("beta", 0.0, 0.0, 1.0) == 0.0
    assert check_in_range("x", 1e300, 0, math.inf) == 1e300
    assert check_betas("betas", [0.9, 0.999]) == (0.9, 0.999)
