"""Run the real megatron-core on a CPU-only machine (gloo instead of NCCL).

megatron-core assumes CUDA throughout: ~175 calls of ``torch.cuda.current_device()``, ~60
tensors created with ``device="cuda"``, the CUDA RNG tracker, a default causal mask built on
"cuda", and ``optimizer/clip_grads.py`` asserting ``param.grad.type() == 'torch.cuda.FloatTensor'``.
Rather than re-implementing any of Megatron's TP/PP/DDP/optimizer/checkpoint code for the CPU
path, :func:`enable_cpu_megatron` redirects those CUDA assumptions to the CPU, so tests and the
laptop demo exercise exactly the code that runs on H100s.

What it installs (see ``../shared/notes/megatron-on-cpu.md`` for how each was found):

1. :class:`_CudaToCpuMode`, a ``TorchFunctionMode`` entered for the whole process, rewriting a
   ``device=`` that names CUDA to ``"cpu"``, making ``Tensor.cuda()`` a no-op and ``.to(cuda)`` a
   move to CPU, and answering the no-argument ``Tensor.type()`` with the CUDA spelling.
2. ``torch.cuda.current_device`` -> ``"cpu"``; ``synchronize``/``empty_cache`` no-ops;
   ``is_available`` stays False so our own code can still tell.
3. A CPU RNG tracker in place of Megatron's CUDA RNG tracker (same ``add``/``fork`` contract,
   CPU generator states), so per-TP-rank RNG streams still differ as Megatron intends. Megatron's
   activation recomputation (``tensor_parallel.checkpoint``, ``CheckpointWithoutOutput``)
   snapshots and restores "all RNG states" (CPU, CUDA generator, tracker) around the recomputed
   forward; its CUDA-generator getter/setter are replaced by :func:`_no_cuda_generator_state` /
   a no-op: on the CPU every draw (dropout included) comes from the CPU generator and the
   tracker's CPU states, which Megatron already snapshots, so a recomputed forward sees the same
   random numbers as the first one.
4. Callers pass an explicit causal mask (:func:`sept_megatron.trainer.model.causal_mask`): the default
   mask is built on "cuda" in code paths the mode cannot see.

Everything is a no-op when CUDA is available (unless ``parallel.device=cpu`` forces it). Tested
with :data:`TESTED_MEGATRON_VERSIONS`; a newer megatron-core may add a CUDA assumption, and the
CPU test suite will show which.

Strict mode (``SEPT_COMPAT_STRICT=1``; the test suite turns it on). The redirect above is what
hid CUDA bugs: a tensor made without a device is on the right device on the CPU and on the wrong
one on CUDA. Strict mode makes that class of bug fail on the CPU too. While the mode is active it
marks *host tensors*: those made without naming a device (factory functions such as
``torch.zeros(2)``, ``torch.tensor(data)``, ``torch.from_numpy``, a tokenizer's tensors) or moved
with ``.cpu()``, and every result computed only from host tensors. A tensor made or moved with an
explicit device (``device=compute_device()``, ``.to(device)``, ``.cuda()``, and Megatron's
``device=torch.cuda.current_device()``) is placed and carries no mark; so do parameters and
autograd's gradients. Two boundaries refuse host tensors with :class:`HostTensorError`:

- every tensor collective and point-to-point call of ``torch.distributed`` (except on groups
  created explicitly with ``backend="gloo"``, which are host-side by design, like Megatron's
  ``*_gloo`` groups), since NCCL would reject a CPU tensor;
- the forward of a Megatron model chunk (:func:`guard_model_inputs`), since CUDA kernels would
  reject a CPU input.

Tensors made before the mode is entered or inside :func:`suspended` carry no mark (unknown, so
allowed): the check finds missing devices in code that runs with megatron, which is where they
matter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

TESTED_MEGATRON_VERSIONS = ("0.16.0", "0.16.1")

STRICT_ENV = "SEPT_COMPAT_STRICT"
_HOST_MARK = "_sept_host_tensor"

_state = {"enabled": False, "mode": None, "strict": False}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how megatron passes torch.cuda.current_device() results.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made while it is active;
    in strict mode it also marks host tensors (see the module docstring)."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        names_device = kwargs.get("device") is not None
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return _unmarked(args[0]) if self.strict else args[0]
        if func is torch.Tensor.to:
            names_device = names_device or _to_names_device(args)
            args, kwargs = _strip_cuda_from_to(args, kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(args[0])
        result = func(*args, **kwargs)
        if self.strict:
            result = _track_host(func, args, kwargs, names_device, result)
        return result


def _to_names_device(args) -> bool:
    """``t.to(device[, dtype])`` or ``t.to(other)`` name a device; ``t.to(dtype)`` does not."""
    if len(args) < 2:
        return False
    target = args[1]
    if isinstance(target, torch.Tensor):
        return not is_host_tensor(target)
    return isinstance(target, (str, int, torch.device)) and not isinstance(target, bool)


def _strip_cuda_from_to(args, kwargs):
    """``t.to("cuda")``, ``t.to(0)``, ``t.to("cuda", dtype)`` -> stay on the CPU."""
    if len(args) >= 2 and _is_cuda_device(args[1]):
        args = (args[0], "cpu") + tuple(args[2:])
    return args, kwargs


def _cuda_type_name(tensor: torch.Tensor) -> str:
    # clip_grads asserts grads are 'torch.cuda.FloatTensor'; answer as if on CUDA.
    cpu_name = torch._C._TensorBase.type(tensor)
    return cpu_name.replace("torch.", "torch.cuda.", 1) if "cuda" not in cpu_name else cpu_name


# --- strict mode: host tensors are refused where CUDA would refuse them -------------------
class HostTensorError(RuntimeError):
    """A tensor made without a device reached a collective or a model forward."""


def is_host_tensor(obj) -> bool:
    return isinstance(obj, torch.Tensor) and getattr(obj, _HOST_MARK, False)


def _tensors_in(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth + 1)
    elif isinstance(getattr(obj, "tensor", None), torch.Tensor):  # torch.distributed.P2POp
        yield obj.tensor


def _mark_host(result):
    for tensor in _tensors_in(result):
        try:
            setattr(tensor, _HOST_MARK, True)
        except (AttributeError, TypeError):  # a tensor type without a __dict__
            pass
    return result


def _unmarked(tensor):
    """``.cuda()`` / ``.to(device)`` of a host tensor that is already on the CPU returns the
    same object in PyTorch; return an alias instead so the original stays marked as host."""
    return tensor.view_as(tensor) if is_host_tensor(tensor) else tensor


def _track_host(func, args, kwargs, names_device: bool, result):
    if func is torch.Tensor.cpu:
        return _mark_host(result.view_as(result) if result is args[0] else result)
    if names_device:
        inputs = args[:1] if func is torch.Tensor.to else ()
        return _unmarked(result) if any(result is t for t in inputs) else result
    inputs = list(_tensors_in((args, kwargs)))
    if all(is_host_tensor(t) for t in inputs):  # also: a factory call with no device
        _mark_host(result)
    return result


def _refuse_host_tensors(where: str, objects) -> None:
    for tensor in _tensors_in(objects):
        if is_host_tensor(tensor):
            raise HostTensorError(
                f"{where}: a {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} "
                "tensor was made without a device (or moved with .cpu()); on a GPU run it "
                "would be on the CPU and be rejected there. Make it with "
                "device=sept_megatron.runtime.distributed.compute_device() or move it with "
                ".to(that device). [sept_megatron.runtime.compat strict mode]"
            )


_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
)
_gloo_groups: set[int] = set()


def _groups_in(args, kwargs):
    import torch.distributed as dist

    found = [a for a in list(args) + list(kwargs.values()) if isinstance(a, dist.ProcessGroup)]
    for item in args[0] if args and isinstance(args[0], (list, tuple)) else ():
        group = getattr(item, "group", None)  # P2POp
        if group is not None:
            found.append(group)
    return found


def _checked_collective(name: str, fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        groups = _groups_in(args, kwargs)
        if not (groups and all(id(g) in _gloo_groups for g in groups)):
            _refuse_host_tensors(f"torch.distributed.{name}", (args, kwargs))
        return fn(*args, **kwargs)

    checked.unchecked = fn
    return checked


def _checked_p2p_op_class(p2p_op):
    """``P2POp`` keeps the unchecked isend/irecv: torch tests ``op.op is isend`` inside
    ``batch_isend_irecv`` (which is itself checked, tensors of every op included)."""

    def unchecked(op):
        return getattr(op, "unchecked", op)

    class CheckedP2POp(p2p_op):
        def __new__(cls, op, tensor, *args, **kwargs):
            return super().__new__(cls, unchecked(op), tensor, *args, **kwargs)

        def __init__(self, op, tensor, *args, **kwargs):
            super().__init__(unchecked(op), tensor, *args, **kwargs)

    CheckedP2POp.__name__ = CheckedP2POp.__qualname__ = "P2POp"
    return CheckedP2POp


def _recording_new_group(fn):
    @functools.wraps(fn)
    def new_group(*args, **kwargs):
        group = fn(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if str(backend).lower() == "gloo" and group is not None:
            _gloo_groups.add(id(group))  # host-side by design (Megatron's *_gloo groups)
        return group

    return new_group


def _install_collective_checks() -> None:
    import torch.distributed as dist

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _checked_collective(name, getattr(dist, name)))
    dist.P2POp = _checked_p2p_op_class(dist.P2POp)
    dist.new_group = _recording_new_group(dist.new_group)


def guard_model_inputs(module: torch.nn.Module) -> None:
    """In strict mode, make ``module``'s forward refuse host tensors (a no-op otherwise)."""
    if not _state["strict"]:
        return

    def refuse(mod, args, kwargs):
        _refuse_host_tensors(f"{type(mod).__name__}.forward", (args, kwargs))

    module.register_forward_pre_hook(refuse, with_kwargs=True)


def strict_enabled() -> bool:
    return _state["strict"]


class CPURNGStatesTracker:
    """Megatron's CUDA RNG tracker contract (``add``/``fork``/states) over CPU generator states."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _no_cuda_generator_state(*args, **kwargs) -> torch.Tensor:
    """Stands in for Megatron's ``_get_cuda_rng_state``: there is no CUDA generator here."""
    return torch.empty(0, dtype=torch.uint8)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Module globals looked up at call time by _get_all_rng_states / _set_all_rng_states.
    mrandom._get_cuda_rng_state = _no_cuda_generator_state
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.is_available = lambda: False


def _check_version() -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found not in TESTED_MEGATRON_VERSIONS:
        warnings.warn(
            f"megatron-core {found} is not among the versions the CPU compatibility layer was "
            f"tested with {TESTED_MEGATRON_VERSIONS}; if a CPU run fails on a CUDA call, "
            "pin megatron-core==0.16.1 or extend sept_megatron/runtime/compat.py.",
            stacklevel=3,
        )


def enable_cpu_megatron(force: bool = False) -> bool:
    """Make megatron-core runnable on the CPU; returns True if it did anything.

    Idempotent. A no-op (returns False) when CUDA is available, so GPU runs are untouched,
    unless ``force`` (``parallel.device=cpu`` on a GPU machine: CPU-path tests stay on gloo).
    Call before building any Megatron model or process group.
    """
    if _state["enabled"]:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _check_version()
    _patch_torch_cuda()
    _install_rng_tracker()
    strict = os.environ.get(STRICT_ENV, "0") not in ("", "0", "false")
    if strict:
        _install_collective_checks()
    mode = _CudaToCpuMode(strict=strict)
    mode.__enter__()  # for the life of the process: Megatron allocates lazily, anywhere
    _state.update(enabled=True, mode=mode, strict=strict)
    log.info(
        "CPU mode: megatron-core CUDA calls are redirected to the CPU (gloo backend)%s",
        "; strict: host tensors are refused at collectives and model forwards" if strict else "",
    )
    return True


def cpu_megatron_enabled() -> bool:
    return _state["enabled"]


@contextlib.contextmanager
def suspended():
    """Run plain-PyTorch code (HF generation, evaluation) without the CUDA->CPU redirect.

    The mode adds Python work to every torch call; code that never touches Megatron does not
    need it. Only valid while our mode is the innermost one, which holds outside Megatron calls.
    """
    mode = _state["mode"]
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()
