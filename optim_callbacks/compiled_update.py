"""One compiled-update mechanism for the registry's optimizers.

An optimizer declares its update as a pure per-element function of one parameter, its
gradient, its state tensors and a small coefficient vector ``c`` (learning rate, decay rates,
bias corrections, ...), written with ordinary tensor operations that end in ``copy_`` into the
parameter and the state::

    def adadelta(param, grad, square_avg, acc_delta, c):
        g = grad.to(c.dtype) ...
        param.copy_(...)

:class:`CompiledUpdate` hands that function to ``torch.compile`` (inductor: C++ with OpenMP
on CPU, Triton on CUDA) once, with dynamic sizes, and calls it once per tensor with every
tensor of the row flattened to one dimension. So:

- **one graph serves every shape.** A model with hundreds of differently shaped parameters
  compiles one graph per parameter dtype, far inside torch's recompile limit (8 graphs per
  function), and every optimizer instance built on the same update shares it;
- **hyper-parameters are data.** The coefficients reach the graph as a tensor, so a scheduler
  changing ``lr`` every step, or the step count in a bias correction, never recompiles;
- **one pass over memory.** Inductor fuses the function into a single loop that reads the
  parameter, gradient and state once and writes them once, in the compute dtype (float32, or
  float64 for float64 parameters) and rounding once to the storage dtype.

Every tensor reaches the graph as a plain tensor at storage offset 0 (over a slice of its
storage: same memory), never a ``Parameter`` (whose shapes dynamo makes static) nor a view at
an offset (offsets 0 and 1 would each specialize a graph), and sizes are not duck-shaped (a
length equal to another, or to the coefficient vector's, would tie their symbols): so the
graphs are one per dtype (two for per-tensor reductions, which inductor's C++ code splits at
4096 elements), whatever the shapes and FSDP2's offsets.

Small tensors (under :data:`PACK_BELOW` elements) are concatenated, updated in one call and
copied back, so hundreds of biases and norm weights cost a few calls instead of one each.
One-element inputs (a size the graph would specialize on) and rows whose tensors do not share
one dense memory layout run the same function uncompiled. If compiling fails (no C++
compiler, a dtype or device inductor cannot generate code for), :meth:`CompiledUpdate.apply`
finishes the step uncompiled and returns the reason; the optimizer instance that called it
then warns once and uses its foreach path. Nothing here is process-wide: other optimizer
instances keep the compiled path. Under a ``TorchDispatchMode`` (``FlopCounterMode``,
``CommDebugMode``), where torch.compile runs a function eagerly and then raises, the update runs
once, eagerly, and the compiled path stays on; every path applies a step exactly once.

Compiled graphs land in torch's on-disk caches (inductor's FX graph cache, on by default), so a
second process with the same dtypes skips code generation and the C++ compiler.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optim_callbacks import _compat
from optim_callbacks.sharded import local_part

__all__ = [
    "COMPILED_DEVICES",
    "CompiledUpdate",
    "check_compiled_devices",
    "coefficient_rows",
    "coefficient_tensor",
    "local_rows",
    "step_compiled",
    "step_rows",
]

# Tensors with fewer elements are concatenated into one call per coefficient vector.
PACK_BELOW = 1 << 15

# Elements per call of an element-wise function run uncompiled (see CompiledUpdate._eager).
EAGER_CHUNK = 1 << 17

# Devices inductor generates code for: C++/OpenMP on CPU, Triton on CUDA and XPU.
COMPILED_DEVICES = ("cpu", "cuda", "xpu")


def check_compiled_devices(params: Sequence[torch.Tensor], owner: str) -> None:
    """Raise, as torch's fused kernels do, when ``fused=True`` meets a parameter that is not a
    floating-point tensor on a device in :data:`COMPILED_DEVICES`."""
    for p in params:
        if p.device.type not in COMPILED_DEVICES or not torch.is_floating_point(p):
            raise RuntimeError(
                f"{owner}(fused=True) requires all the params to be floating point Tensors of "
                f"supported devices: {list(COMPILED_DEVICES)}; got a {p.dtype} tensor on "
                f"{p.device.type!r}"
            )


def _dense_flat(row: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """The row's tensors as aligned 1-D tensors over their memory, or ``None`` if they have no
    common dense layout (then element ``k`` of each would not be the same element).

    The 1-D tensors alias the memory without being views (``set_``) and do not require grad,
    so every row looks alike to the compiled graph's guards, which otherwise also check a
    view's base layout and ``requires_grad``: one graph per dtype, not three.
    """
    first = row[0]
    if not all(t.is_contiguous() for t in row):
        if any(t.stride() != first.stride() or t.shape != first.shape for t in row):
            return None
        dims = sorted((s, n) for s, n in zip(first.stride(), first.shape, strict=True) if n != 1)
        expected = 1
        for stride, size in dims:
            if stride != expected:
                return None  # overlapping or with gaps
            expected *= size
    return [_alias_1d(t) for t in row]


def _alias_1d(t: torch.Tensor) -> torch.Tensor:
    """A plain 1-D tensor over ``t``'s ``numel`` elements of memory (``t`` dense)."""
    return _alias(t, (t.numel(),), (1,))


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory with its shape and strides as a plain tensor (0-d as one element:
    inductor, torch 2.13, drops in-place writes to 0-d graph inputs). Not a ``Parameter``,
    whose shapes dynamo makes static (``force_parameter_static_shapes``): one graph per shape."""
    if t.dim() == 0:
        return _alias(t, (1,), (1,))
    return _alias(t, tuple(t.shape), t.stride())


def _alias(t: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``shape`` and ``stride`` over ``t``'s memory, at storage offset 0 (over a
    slice of ``t``'s storage), without autograd history. Views at an offset (FSDP2's gradients
    and shards) and tensors of their own then look alike to the compiled graph's guards, which
    otherwise specialize a storage offset on 0 and 1 (one graph more each)."""
    size = t.element_size()
    start = t.storage_offset() * size
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    memory = t.untyped_storage()[start : start + extent * size]
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(memory, 0, shape, stride)


class CompiledUpdate:
    """A per-element update function, compiled once with dynamic sizes, applied row by row.

    ``update(param, grad, *state, c)`` mutates its tensor arguments with ``copy_`` and
    computes in ``c.dtype``. A row is ``[param, grad, *state]``, tensors of one shape; rows
    of FSDP2 parameters are given as their local shards.
    """

    def __init__(
        self,
        update: Callable[..., None],
        *,
        per_tensor: bool = False,
        flatten: bool = True,
        sliceable: bool | None = None,
    ) -> None:
        self.update = update
        self.name = update.__name__
        # An update with per-tensor reductions (LAMB's norms) must see each tensor whole; one
        # that reduces along dimensions (Adafactor's rows and columns) also in its shape.
        self.per_tensor = per_tensor or not flatten
        self.flatten = flatten
        # Whether slices of a row may be updated one by one (element-wise, or accumulating its
        # sums into its outputs): what the uncompiled path does with large rows.
        self.sliceable = not self.per_tensor if sliceable is None else sliceable
        # One compiled copy of the function per dtypes of its inputs (see _compiled_for).
        self._compiled: dict[tuple[torch.dtype, ...], Callable[..., None]] = {}

    def _compiled_for(self, tensors: Sequence[torch.Tensor]) -> Callable[..., None]:
        """The compiled function for these inputs' dtypes: a copy of ``update`` with a code
        object of its own per dtypes, so each has torch's recompile limit (8 graphs per code
        object) to itself; the graphs of one dtype stay few (one; two or three for per-tensor
        reductions and ranks), however many dtypes a process meets."""
        key = tuple(t.dtype for t in tensors)
        compiled = self._compiled.get(key)
        if compiled is None:
            update = self.update
            copy = types.FunctionType(
                update.__code__.replace(),
                update.__globals__,
                update.__name__,
                update.__defaults__,
                update.__closure__,
            )
            # dynamic_threads: with symbolic sizes inductor would otherwise emit a serial loop.
            compiled = torch.compile(
                copy, fullgraph=True, dynamic=True, options={"cpp.dynamic_threads": True}
            )
            self._compiled[key] = compiled
        return compiled

    def apply(
        self,
        rows: Sequence[Sequence[torch.Tensor]],
        coefficients: Sequence[torch.Tensor],
        *,
        compiled: bool = True,
        pack: bool = True,
    ) -> str | None:
        """Update every row with its coefficient vector; ``None`` when every call that could
        compile did, else why compiling failed (the calls from there on ran uncompiled).

        A row is ``[param, grad, *state]``: every tensor but the gradient is written. Tensors
        of at least :data:`PACK_BELOW` elements get one call each; with ``pack``, smaller ones
        sharing a coefficient vector and dtypes are concatenated into one call and copied back,
        so a model's hundreds of biases and norms cost a few calls, not hundreds. Every written
        tensor's autograd version counter is bumped once, as by an in-place torch op. With
        ``compiled=False`` the function runs eagerly (plain torch ops) on the same calls, in
        cache-sized slices (:meth:`_eager`).
        """
        failure: str | None = None
        packs: dict[tuple[Any, ...], tuple[torch.Tensor, list[Sequence[torch.Tensor]]]] = {}
        written: list[torch.Tensor] = []
        for row, c in zip(rows, coefficients, strict=True):
            numel = row[0].numel()
            if numel == 0:
                continue
            if pack and numel < PACK_BELOW and not self.per_tensor:
                key = (id(c), *(t.dtype for t in row))
                packs.setdefault(key, (c, []))[1].append(row)
                continue
            flat = _dense_flat(row) if self.flatten else [_plain(t) for t in row]
            if flat is None:  # no common dense layout
                self.update(*row, c)
                continue
            if compiled:
                failure = self._call(flat, c, failure)
            else:
                self._eager(flat, c)
            written.extend(t for j, t in enumerate(row) if j != 1)
        for c, small in packs.values():
            columns = [list(column) for column in zip(*small, strict=True)]
            flats = [torch.cat([t.reshape(-1) for t in column]) for column in columns]
            if compiled:
                failure = self._call(flats, c, failure)
            else:
                self._eager(flats, c)
            sizes = [t.numel() for t in columns[0]]
            for j, column in enumerate(columns):
                if j != 1:  # the gradient is only read
                    pieces = flats[j].split(sizes)
                    torch._foreach_copy_(
                        column, [piece.view_as(t) for piece, t in zip(pieces, column, strict=True)]
                    )
        # The writes through set_ aliases bypass autograd's version counters; bump them as an
        # in-place op would, so a backward through a graph that saved a tensor from before the
        # step raises torch's "modified by an inplace operation" (packed rows were written with
        # _foreach_copy_, which already did). One call for all tensors.
        torch.autograd.graph.increment_version(written)
        return failure

    def _eager(self, tensors: list[torch.Tensor], c: torch.Tensor) -> None:
        """The function uncompiled: on 1-D tensors in slices of :data:`EAGER_CHUNK` elements
        (each operation's temporaries then stay in cache and in the allocator's reused memory,
        not fresh pages per operation: 5-7x faster than on whole tensors, faster than
        hand-written foreach kernels; see bench/optimizer_step.py --bert-paths), whole
        tensors unless the function is ``sliceable``."""
        numel = tensors[0].numel()
        if not self.sliceable or tensors[0].dim() != 1 or numel <= EAGER_CHUNK:
            self.update(*tensors, c)
            return
        # Tensors of another length (a row's sums of squares) go whole to every slice.
        parts = [t.split(EAGER_CHUNK) if t.numel() == numel else None for t in tensors]
        for k in range(-(-numel // EAGER_CHUNK)):
            self.update(*(t if p is None else p[k] for p, t in zip(parts, tensors, strict=True)), c)

    def _call(self, flat: list[torch.Tensor], c: torch.Tensor, failure: str | None) -> str | None:
        """One call: compiled unless compiling already failed in this :meth:`apply`, the
        tensors have one element (a size the graph would specialize on) or a dispatch mode is
        active. Every path applies the update exactly once."""
        if failure is None and (flat[0].numel() > 1 or self.per_tensor):
            if _compat.dispatch_mode_active():
                # dynamo would run the function eagerly and then raise; run it once, eagerly,
                # and keep the compiled path for later calls (not a compile failure).
                self.update(*flat, c)
                return None
            try:
                with _compat.dynamic_shape_config(size_oblivious=self.flatten):
                    self._compiled_for([*flat, c])(*flat, c)
                return None
            except Exception as error:  # compiling failed; a real bug re-raises just below
                failure = f"{type(error).__name__}: {_first_line(error)}"
                if _compat.compiled_call_ran_eagerly(error):
                    return failure  # the update already ran
        self.update(*flat, c)
        return failure


def _first_line(error: BaseException) -> str:
    """The message's first line; for torch's "backend='inductor' raised:" the cause's too."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "no message"
    if lines[0].endswith("raised:") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"[:300]
    return lines[0][:300]


def coefficient_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a 1-D tensor in ``like``'s compute dtype (float64 for float64 tensors,
    float32 otherwise) on ``like``'s device."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor([float(v) for v in values], dtype=dtype).to(like.device)


def local_rows(*columns: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Rows ``[param, grad, *state]`` from aligned columns (params, grads, each state), every
    tensor as its local shard (FSDP2's ``DTensor``; other tensors as they are)."""
    return [[local_part(t) for t in row] for row in zip(*columns, strict=True)]


def coefficient_rows(
    rows: Sequence[Sequence[torch.Tensor]],
    values_for_step: Callable[[float], Sequence[float]],
    steps: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One coefficient tensor per row, ``values_for_step(step)`` with the row's step count
    (``0.0`` without ``steps``), shared by the rows with the same step, device and dtype."""
    tables: dict[tuple[float, torch.device, torch.dtype], torch.Tensor] = {}
    out = []
    for i, row in enumerate(rows):
        step = steps[i].item() if steps is not None else 0.0
        key = (step, row[0].device, row[0].dtype)
        if key not in tables:
            tables[key] = coefficient_tensor(values_for_step(step), row[0])
        out.append(tables[key])
    return out


def step_compiled(
    optimizer: Any,
    update: CompiledUpdate,
    rows: Sequence[Sequence[torch.Tensor]],
    coefficients: Sequence[torch.Tensor],
) -> None:
    """Apply ``update`` for ``optimizer``; if compiling failed, record why on the instance
    (``optimizer.compile_failure``, which sends its later steps to foreach) and warn once."""
    failure = update.apply(rows, coefficients)
    if failure is not None and optimizer.compile_failure is None:
        optimizer.compile_failure = failure
        warnings.warn(
            f"{type(optimizer).__name__}(fused=True): compiling the update failed ({failure}); "
            "this optimizer steps uncompiled (foreach) from now on (other optimizers keep the "
            "compiled path)",
            RuntimeWarning,
            stacklevel=4,
        )


def step_rows(
    optimizer: Any,
    group: dict[str, Any],
    update: CompiledUpdate,
    rows: Sequence[Sequence[torch.Tensor]],
    coefficients: Sequence[torch.Tensor],
) -> None:
    """One group's rows by the group's implementation, all from the one function ``update``:

    - ``fused`` (unless compiling failed for this optimizer instance): compiled
      (:func:`step_compiled`);
    - ``foreach`` ``None``/``True``, and after a failed compile: eagerly, small tensors packed;
    - ``foreach=False`` (the registry's ``for-loop``): eagerly, one tensor at a time.
    """
    if group.get("fused") and optimizer.compile_failure is None:
        check_compiled_devices([row[0] for row in rows], type(optimizer).__name__)
        step_compiled(optimizer, update, rows, coefficients)
    else:
        update.apply(rows, coefficients, compiled=False, pack=group.get("foreach") is not False)
