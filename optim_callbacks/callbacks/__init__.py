"""Lightning callbacks, one concern per file."""

from optim_callbacks.callbacks.amp_epsilon import AmpEpsilon
from optim_callbacks.callbacks.clipping import GradientClipping

__all__: list[str] = ["AmpEpsilon", "GradientClipping"]
