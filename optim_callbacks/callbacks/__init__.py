"""Lightning callbacks, one concern per file."""

__all__: list[str] = []
