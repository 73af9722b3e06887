"""The one door to torch and Lightning internals.

``optim_callbacks`` needs a few things that neither torch nor Lightning offers as public API. This
module is the only one in the package that touches them: each has one named function below that
says what it reads and why, with a fallback to public API where one exists.
``tests/lib/test_compat.py`` asserts, on the installed versions, that every private path still
resolves (so no fallback is silently in use) and that each fallback gives the same answer where
one can be computed. A torch or Lightning upgrade that moves one of them fails there, by name,
and not somewhere inside a callback. When a fallback is taken at run time, it warns once.

Not here, on purpose: the ``torch._foreach_*`` operations (``_foreach_norm``, ``_foreach_mul_``,
...). Despite the underscore they are documented torch API (the "Foreach operations" section of
the torch reference), the kernels ``torch.optim`` itself is built on; they are called where they
are needed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "FUSED_DEVICES_FALLBACK",
    "NORM_BASE_FALLBACK",
    "batches_that_stepped",
    "compiled_call_ran_eagerly",
    "dispatch_mode_active",
    "dynamic_shape_config",
    "fused_kernel_devices",
    "inductor_cpp_compiler",
    "norm_base_classes",
    "saved_callback_state",
    "sharded_checkpoint_metadata_name",
    "step_unscales_gradients",
    "unscale_once",
]

# The file of a Lightning distributed-checkpoint folder (FSDP, ModelParallelStrategy) that holds
# everything but the sharded tensors: loops, callbacks, hyper-parameters.
SHARDED_METADATA_FALLBACK = "meta.pt"

# Device types torch.optim had fused Adam/AdamW/SGD kernels for when this was written (torch's own
# list adds hpu, mtia and the privateuse1 backend).
FUSED_DEVICES_FALLBACK: tuple[str, ...] = ("cpu", "cuda", "mps", "xpu")

# Every public class of torch.nn derived from torch's private normalization base class.
NORM_BASE_FALLBACK: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)

_warned: set[str] = set()


def _fell_back(private: str, fallback: str) -> None:
    """Warn once per access that its private path is gone and the fallback is in use."""
    if private in _warned:
        return
    _warned.add(private)
    warnings.warn(
        f"optim_callbacks._compat: {private} does not resolve on the installed torch/Lightning; "
        f"using {fallback} instead (tests/lib/test_compat.py names what moved)",
        RuntimeWarning,
        stacklevel=3,
    )


def fused_kernel_devices() -> tuple[str, ...]:
    """Device types for which torch has fused optimizer kernels (``fused=True``).

    Reads ``torch.utils._foreach_utils._get_fused_kernels_supported_devices()``, the list
    torch's own optimizers check ``fused=True`` against. ``build_optimizer`` asks it before it
    picks fused kernels, so that ``impl="auto"`` never requests a kernel torch would refuse.
    Fallback: :data:`FUSED_DEVICES_FALLBACK`.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        _fell_back(
            "torch.utils._foreach_utils._get_fused_kernels_supported_devices",
            f"FUSED_DEVICES_FALLBACK {FUSED_DEVICES_FALLBACK}",
        )
        return FUSED_DEVICES_FALLBACK
    return tuple(_get_fused_kernels_supported_devices())


def norm_base_classes() -> tuple[type[nn.Module], ...]:
    """The base classes of torch's batch and instance normalization modules.

    Reads ``torch.nn.modules.batchnorm._NormBase``, the one class every ``BatchNorm*``,
    ``SyncBatchNorm`` and ``InstanceNorm*`` (lazy ones included) derives from, so that
    :func:`optim_callbacks.param_groups.no_decay_parameter_names` also recognises subclasses
    of them. Fallback: :data:`NORM_BASE_FALLBACK`, the public classes themselves.
    """
    base = getattr(nn.modules.batchnorm, "_NormBase", None)
    if not isinstance(base, type):
        _fell_back(
            "torch.nn.modules.batchnorm._NormBase", "the public BatchNorm/InstanceNorm classes"
        )
        return NORM_BASE_FALLBACK
    return (base,)


def batches_that_stepped(trainer: Any) -> int:
    """Training batches so far in which the optimizer stepped: the ``step`` Lightning gives its
    loggers for metrics logged in the current batch (what ``log_every_n_steps`` counts).

    Reads ``trainer.fit_loop.epoch_loop._batches_that_stepped`` (Lightning's own
    ``LearningRateMonitor`` logs at it; there is no public attribute). Lightning increments it
    after ``on_train_batch_end``, so it is the same number throughout one batch's hooks.
    Fallback: ``trainer.global_step``, the same number under automatic optimization (one
    optimizer step per batch) when read before the batch's optimizer step, i.e. up to
    ``on_before_optimizer_step``; with manual optimization and several optimizer steps per
    batch it counts each step.
    """
    loop = trainer.fit_loop.epoch_loop
    try:
        return int(loop._batches_that_stepped)
    except AttributeError:
        _fell_back("trainer.fit_loop.epoch_loop._batches_that_stepped", "trainer.global_step")
        return int(trainer.global_step)


def step_unscales_gradients(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` unscales AMP-scaled gradients itself (torch's ``fused=True``
    kernels), so that a ``GradScaler`` hands it the scale instead of unscaling ``.grad`` first.

    Reads ``optimizer._step_supports_amp_scaling``, the flag ``GradScaler.step`` and Lightning's
    ``MixedPrecision`` plugin decide by. Lightning leaves such an optimizer's gradients scaled
    until its step, so a callback that reads gradients must unscale them first. The flag is set
    only on optimizers that have it (absent means no); fallback for an optimizer without it: a
    ``torch.optim`` class built with ``fused=True``.
    """
    flag = getattr(optimizer, "_step_supports_amp_scaling", None)
    if flag is not None:
        return bool(flag)
    fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
    return fused and type(optimizer).__module__.startswith("torch.optim")


def _already_unscaled(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool | None:
    """Whether ``scaler.unscale_(optimizer)`` was called since the last ``update()``; ``None``
    when the private state does not resolve."""
    try:
        from torch.amp.grad_scaler import OptState

        return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED
    except (ImportError, AttributeError, KeyError, TypeError):
        return None


def unscale_once(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it was already called since the last ``update()``
    (a second call would raise), so several callbacks may ask for unscaled gradients in one step.

    Reads ``scaler._per_optimizer_states[id(optimizer)]["stage"]`` against
    ``torch.amp.grad_scaler.OptState.UNSCALED``, the state ``unscale_`` itself checks. Fallback:
    call ``unscale_`` and take torch's "already been called" ``RuntimeError`` as the answer.
    """
    unscaled = _already_unscaled(scaler, optimizer)
    if unscaled is None:
        _fell_back(
            "GradScaler._per_optimizer_states / torch.amp.grad_scaler.OptState",
            "GradScaler.unscale_ and its 'already been called' RuntimeError",
        )
        try:
            scaler.unscale_(optimizer)
        except RuntimeError as error:
            if "already been called" not in str(error):
                raise
        return
    if not unscaled:
        scaler.unscale_(optimizer)


def sharded_checkpoint_metadata_name() -> str:
    """The name of the file in a Lightning distributed-checkpoint folder that holds the
    non-tensor state (callbacks among it).

    Reads ``lightning.fabric.utilities.load._METADATA_FILENAME``, what Lightning's sharded
    strategies write and read. Fallback: :data:`SHARDED_METADATA_FALLBACK`.
    """
    try:
        from lightning.fabric.utilities.load import _METADATA_FILENAME
    except ImportError:
        _fell_back(
            "lightning.fabric.utilities.load._METADATA_FILENAME",
            f"SHARDED_METADATA_FALLBACK {SHARDED_METADATA_FALLBACK!r}",
        )
        return SHARDED_METADATA_FALLBACK
    return str(_METADATA_FILENAME)


def saved_callback_state(ckpt_path: str | os.PathLike, state_key: str) -> dict[str, Any] | None:
    """The state a callback saved under ``state_key`` in a checkpoint: a ``.ckpt`` file, or a
    distributed-checkpoint folder (its metadata file, see
    :func:`sharded_checkpoint_metadata_name`); ``None`` when it holds none.

    For callbacks that must act before Lightning restores them: under sharded strategies
    Lightning loads the optimizer state (``restore_checkpoint_after_setup``) after
    ``on_fit_start`` but before it restores the callbacks, so a callback that replaces the
    optimizer in a resumed run (the Adam→SGD switch) reads its own state here first.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / sharded_checkpoint_metadata_name()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=path.suffix != ".pt")
    return (checkpoint.get("callbacks") or {}).get(state_key)


def inductor_cpp_compiler(command: str) -> contextlib.AbstractContextManager[Any]:
    """A context in which torch's inductor builds C++ with ``command`` and skips its caches, so
    the next compile really runs it. The tests point it at a compiler that does not exist to
    cause a real compile failure (``torch._inductor.config.cpp.cxx`` is private)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.cxx": (command,), "force_disable_caches": True})


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` that makes ``torch.compile`` skip frames is active
    (``FlopCounterMode``, ``CommDebugMode``, ...): then a compiled function runs eagerly, and
    with ``fullgraph=True`` raises "found no compiled frames" *after* it ran.

    Reads ``torch.utils._python_dispatch.any_torch_dispatch_mode_on_stack``, the test dynamo's
    ``convert_frame`` itself skips by (infra modes and modes that ignore compile internals do
    not count). Fallback: ``False`` (then :func:`compiled_call_ran_eagerly` still keeps a
    compiled update from running twice).
    """
    try:
        from torch.utils._python_dispatch import any_torch_dispatch_mode_on_stack
    except ImportError:
        _fell_back(
            "torch.utils._python_dispatch.any_torch_dispatch_mode_on_stack",
            "no dispatch-mode check (compiled_call_ran_eagerly still catches the eager run)",
        )
        return False
    return bool(any_torch_dispatch_mode_on_stack())


def compiled_call_ran_eagerly(error: BaseException) -> bool:
    """Whether ``error``, raised by a ``torch.compile(fullgraph=True)`` function, says dynamo
    skipped the frame, ran the function eagerly to its end, and only then refused ("found no
    compiled frames", torch 2.13's ``eval_frame``): the function's effects already happened.
    No private name: the wording is torch's, and ``tests/lib/test_compat.py`` checks it."""
    return isinstance(error, RuntimeError) and "found no compiled frames" in str(error)


def dynamic_shape_config(*, size_oblivious: bool) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``torch.compile`` gives every input size, stride and storage offset
    its own symbol (``use_duck_shape=False``: equal values are not assumed equal, so a
    coefficient vector of 7 entries next to a 7-element tensor, or an FSDP2 shard whose storage
    offset equals its length, do not tie symbols and recompile on the next shape) and, with
    ``size_oblivious``, does not specialize sizes and offsets on 0 and 1
    (``backed_size_oblivious``: a gradient view at storage offset 0 and one at offset 4096 share
    one graph). Only for functions whose inputs never broadcast a size-1 dimension.

    Patches ``torch.fx.experimental._config`` (private): read when a frame is traced, so the
    context must surround the compiled call."""
    from torch.fx.experimental import _config as shape_config

    return shape_config.patch(use_duck_shape=False, backed_size_oblivious=size_oblivious)
