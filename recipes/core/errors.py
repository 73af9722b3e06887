"""The one exception type the recipes' CLI reports as a usage error (exit status 2)."""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A problem with what the user asked for, found after training started (e.g. more warmup
    steps than the run has); the CLI prints its message on one line and exits with status 2."""
