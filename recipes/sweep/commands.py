"""What the sweep's commands (:mod:`recipes.compare`, :mod:`recipes.report` and the claims
study, :mod:`recipes.claims`, on the sweep's engine) share: how they report an error."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["command_errors"]


@contextmanager
def command_errors(
    prog: str, failures: tuple[type[Exception], ...] = (), resumable: bool = False
) -> Iterator[None]:
    """Turn what the body raises into ``prog``'s one-line message and exit status: a
    ``ValueError`` (the user's mistake) status 2, its first line; one of ``failures`` (e.g. a
    storage that cannot be reached) status 1; with ``resumable``, Ctrl-C status 130, saying
    that the same command resumes."""
    try:
        yield
    except ValueError as error:
        print(f"{prog}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    except failures as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if not resumable:
            raise
        print(f"\n{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
