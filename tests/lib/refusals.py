"""The house rule for bad input, as one assertion: one ``ValueError``, one line, naming what
the test expects (the parameter, the value, what is allowed).

Not collected by pytest (no ``test_`` prefix)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def assert_refused(build: Callable[..., Any], kwargs: dict[str, Any], *needles: str) -> str:
    """``build(**kwargs)`` raises a ``ValueError`` whose message is one line holding each of
    ``needles``; returns the message."""
    with pytest.raises(ValueError) as error:
        build(**kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message
