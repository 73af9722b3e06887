"""The one door to torch/Lightning internals (``optim_callbacks._compat``) still opens.

For every private access: the private path resolves on the installed torch and Lightning (no
fallback in use: a fallback warning is an error here), ``_compat`` answers what the private path
says, and the fallback gives the same answer where one can be computed. When an upgrade moves
one of them, the test named after it fails.

This is the one test module that reads the private attributes directly: that is its subject.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import optim_callbacks
from optim_callbacks import OPTIMIZERS, _compat, build_optimizer
from tests.lib.tiny import RecordingLogger, TinyRegressor, tiny_trainer

pytestmark = pytest.mark.filterwarnings("error:optim_callbacks._compat")


@pytest.fixture
def fallback_warns(monkeypatch):
    """A fresh warn-once memory, and a context manager asserting a fallback warning."""
    monkeypatch.setattr(_compat, "_warned", set())
    return lambda: pytest.warns(RuntimeWarning, match=r"optim_callbacks\._compat: .* instead")


# ------------------------------------------------------------------------ fused kernel devices
def test_fused_kernel_devices_come_from_torch(monkeypatch, fallback_warns):
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    assert "cuda" in devices and "cpu" in devices
    assert _compat.fused_kernel_devices() == tuple(devices)
    # The fallback promises no device torch's list lacks.
    assert set(_compat.FUSED_DEVICES_FALLBACK) <= set(devices)

    monkeypatch.delattr(torch.utils._foreach_utils, "_get_fused_kernels_supported_devices")
    with fallback_warns():
        assert _compat.fused_kernel_devices() == _compat.FUSED_DEVICES_FALLBACK


# ------------------------------------------------------------ sharded checkpoint metadata file
def test_sharded_checkpoint_metadata_name_comes_from_lightning(monkeypatch, fallback_warns):
    import lightning.fabric.utilities.load as load

    assert _compat.sharded_checkpoint_metadata_name() == load._METADATA_FILENAME
    assert _compat.SHARDED_METADATA_FALLBACK == load._METADATA_FILENAME
    monkeypatch.delattr(load, "_METADATA_FILENAME")
    with fallback_warns():
        assert _compat.sharded_checkpoint_metadata_name() == _compat.SHARDED_METADATA_FALLBACK


def test_saved_callback_state_reads_a_checkpoint_file(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(
        tmp_path, max_steps=2, callbacks=[checkpoints], enable_checkpointing=True
    )
    trainer.fit(TinyRegressor(samples=32))
    state = _compat.saved_callback_state(checkpoints.last_model_path, checkpoints.state_key)
    assert state == checkpoints.state_dict()
    assert _compat.saved_callback_state(checkpoints.last_model_path, "NoSuchCallback") is None


# ------------------------------------------------------------------------- normalization base
def _public_nn_modules() -> list[type[nn.Module]]:
    return [
        cls
        for name, cls in vars(nn).items()
        if not name.startswith("_") and inspect.isclass(cls) and issubclass(cls, nn.Module)
    ]


def test_norm_base_is_the_base_of_batch_and_instance_norm(monkeypatch, fallback_warns):
    base = nn.modules.batchnorm._NormBase
    assert base in nn.BatchNorm1d.__mro__ and base in nn.InstanceNorm2d.__mro__
    assert _compat.norm_base_classes() == (base,)
    # The fallback names exactly the public classes derived from it.
    derived = {cls for cls in _public_nn_modules() if issubclass(cls, base)}
    assert derived == set(_compat.NORM_BASE_FALLBACK)

    monkeypatch.delattr(nn.modules.batchnorm, "_NormBase")
    with fallback_warns():
        assert _compat.norm_base_classes() == _compat.NORM_BASE_FALLBACK


# ------------------------------------------------------------------------ batches that stepped
class _Steps(Callback):
    """Per hook: the private count, ``_compat``'s answer and the fallback's."""

    def __init__(self, fallback_warns) -> None:
        self.fallback_warns = fallback_warns
        self.seen: list[tuple[str, int, int, int | None]] = []

    def _record(self, trainer, hook: str) -> None:
        loop = trainer.fit_loop.epoch_loop
        private = loop._batches_that_stepped
        answer = _compat.batches_that_stepped(trainer)
        fallback = None
        if hook == "on_before_optimizer_step":  # where the fallback is documented to agree
            value = vars(loop).pop("_batches_that_stepped")
            _compat._warned.clear()  # warn once: once per call here
            try:
                with self.fallback_warns():
                    fallback = _compat.batches_that_stepped(trainer)
            finally:
                loop._batches_that_stepped = value
        self.seen.append((hook, private, answer, fallback))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._record(trainer, "on_before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, "on_train_batch_end")


def test_batches_that_stepped_is_the_step_lightning_logs_the_batch_at(tmp_path, fallback_warns):
    steps, logger = _Steps(fallback_warns), RecordingLogger()
    trainer = tiny_trainer(
        tmp_path,
        max_steps=5,
        accumulate_grad_batches=2,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[steps],
    )
    trainer.fit(TinyRegressor(samples=160))
    assert hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped")
    assert all(private == answer for _, private, answer, _ in steps.seen)
    before_step = [(p, f) for hook, p, _, f in steps.seen if hook == "on_before_optimizer_step"]
    assert before_step == [(s, s) for s in range(5)]  # the fallback agrees there
    # One batch's hooks see one number; Lightning logs that batch's metrics at it.
    ends = [p for hook, p, _, _ in steps.seen if hook == "on_train_batch_end"]
    assert ends == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [step for step, metrics in logger.rows if "train_loss" in metrics] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------ optimizers that unscale in step
@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "for-loop"])
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_step_unscales_gradients_reads_torchs_flag_and_the_fallback_agrees(name, impl):
    params = [nn.Parameter(torch.zeros(3))]
    if impl == "fused" and "fused" not in OPTIMIZERS.get(name).options():
        with pytest.raises(ValueError, match="impl: 'fused' is not available"):
            build_optimizer(name, params, impl=impl)
        return
    optimizer = build_optimizer(name, params, impl=impl)
    flag = getattr(optimizer, "_step_supports_amp_scaling", False)
    # torch's fused kernels unscale; our compiled updates (AdaBelief, Adadelta, ...) do not.
    torch_fused = type(optimizer).__module__.startswith("torch.optim")
    assert flag == bool(optimizer.defaults.get("fused") and torch_fused)
    assert _compat.step_unscales_gradients(optimizer) is flag
    vars(optimizer).pop("_step_supports_amp_scaling", None)
    assert _compat.step_unscales_gradients(optimizer) is flag  # the fallback's answer


def test_torch_fused_kernels_set_the_flag():
    fused = torch.optim.Adam([nn.Parameter(torch.zeros(2))], fused=True)
    assert vars(fused)["_step_supports_amp_scaling"] is True


# -------------------------------------------------------------------------- GradScaler stage
def _scaled_step(scale: float = 8.0):
    param = nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale((param * torch.arange(4.0)).sum()).backward()
    return param, optimizer, scaler


def test_grad_scaler_stage_resolves_and_unscale_once_is_idempotent(monkeypatch, fallback_warns):
    from torch.amp.grad_scaler import OptState

    param, optimizer, scaler = _scaled_step()
    assert param.grad.tolist() == [0.0, 8.0, 16.0, 24.0]
    assert scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY
    assert _compat._already_unscaled(scaler, optimizer) is False
    _compat.unscale_once(scaler, optimizer)
    assert scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED
    assert _compat._already_unscaled(scaler, optimizer) is True
    _compat.unscale_once(scaler, optimizer)  # a second unscale_ would raise
    assert param.grad.tolist() == [0.0, 1.0, 2.0, 3.0]

    # The fallback (unscale_ and torch's "already been called" error) gives the same gradients.
    param, optimizer, scaler = _scaled_step()
    monkeypatch.setattr(_compat, "_already_unscaled", lambda scaler, optimizer: None)
    with fallback_warns():
        _compat.unscale_once(scaler, optimizer)
    _compat.unscale_once(scaler, optimizer)  # no error either (and warned once only)
    assert param.grad.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(optimizer)  # the error the fallback relies on


# ----------------------------------------------------------------------- the door is the only one
def _private_accesses(path: Path, own_names: frozenset[str] = frozenset()) -> list[str]:
    """Private names of other packages a module reaches: ``obj._name`` (not on ``self``,
    ``cls``, ``super()`` or one of ``own_names``), ``from torch... import _name`` and
    ``getattr(obj, "_name")``; ``torch._foreach_*`` (documented torch API) and imports from
    our own package aside."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            own = isinstance(base, ast.Name) and base.id in {"self", "cls", *own_names}
            own |= isinstance(base, ast.Call) and getattr(base.func, "id", None) == "super"
            if not own and not node.attr.startswith(("__", "_foreach_")):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith(
            "optim_callbacks"
        ):
            names = [a.name for a in node.names if a.name.startswith("_")]
            parts = (node.module or "").split(".")
            if names or any(p.startswith("_") and not p.startswith("__") for p in parts):
                found.append(f"{path.name}:{node.lineno} from {node.module} import {names}")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) in {"getattr", "hasattr", "setattr"}
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            found.append(f"{path.name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_inductor_cpp_compiler_sets_inductors_compiler_for_the_context():
    import torch._inductor.config as inductor_config

    before = inductor_config.cpp.cxx
    with _compat.inductor_cpp_compiler("/nonexistent/c++"):
        assert inductor_config.cpp.cxx == ("/nonexistent/c++",)
        assert torch.compiler.config.force_disable_caches
    assert inductor_config.cpp.cxx == before


def test_only_the_compat_module_reaches_torch_or_lightning_internals():
    package = Path(optim_callbacks.__file__).parent
    outside = {
        str(path.relative_to(package)): _private_accesses(path)
        for path in sorted(package.rglob("*.py"))
        if path.name != "_compat.py"
    }
    assert {module: found for module, found in outside.items() if found} == {}
    assert _private_accesses(package / "_compat.py")  # the scan sees the accesses it exists for


def test_library_tests_reach_no_torch_or_lightning_internals_either():
    """Only this module reads them; the others go through public API (our own modules' private
    state, such as AdaBelief's fused-path switch, is ours to test)."""
    here = Path(__file__).parent
    scripts = here.parent / "scripts"
    files = [p for p in sorted(here.glob("*.py")) if p.name != Path(__file__).name]
    files += [scripts / f"ddp_{name}.py" for name in ("clipping", "moments", "switch")]
    found = {p.name: _private_accesses(p, frozenset({"adabelief"})) for p in files}
    assert {name: accesses for name, accesses in found.items() if accesses} == {}


def test_dispatch_mode_active_is_dynamos_test_and_the_eager_run_is_recognised():
    """Under a dispatch mode a ``fullgraph=True`` function runs eagerly once and then raises
    "found no compiled frames": ``dispatch_mode_active`` says so before the call (as dynamo's
    own test does), ``compiled_call_ran_eagerly`` recognises the error after it."""
    from torch.utils._python_dispatch import any_torch_dispatch_mode_on_stack
    from torch.utils.flop_counter import FlopCounterMode

    def add_one(x: torch.Tensor) -> None:
        x.add_(1.0)

    compiled = torch.compile(add_one, fullgraph=True)
    x = torch.zeros(3)
    assert not _compat.dispatch_mode_active() and not any_torch_dispatch_mode_on_stack()
    with FlopCounterMode(display=False):
        assert _compat.dispatch_mode_active() and any_torch_dispatch_mode_on_stack()
        with pytest.raises(RuntimeError) as caught:
            compiled(x)
    assert _compat.compiled_call_ran_eagerly(caught.value)
    assert torch.equal(x, torch.ones(3))  # it ran, once, before raising
    assert not _compat.compiled_call_ran_eagerly(RuntimeError("compiling failed"))


@pytest.mark.parametrize("size_oblivious", [True, False])
def test_dynamic_shape_config_patches_the_shape_settings_for_the_context(size_oblivious):
    from torch.fx.experimental import _config as shape_config

    before = (shape_config.use_duck_shape, shape_config.backed_size_oblivious)
    with _compat.dynamic_shape_config(size_oblivious=size_oblivious):
        assert shape_config.use_duck_shape is False
        assert shape_config.backed_size_oblivious is size_oblivious
    assert (shape_config.use_duck_shape, shape_config.backed_size_oblivious) == before
