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
4. Callers pass an explicit causal mask (:func:`sept_megatron.model.causal_mask`): the default
   mask is built on "cuda" in code paths the mode cannot see.

Everything is a no-op when CUDA is available. Tested with :data:`TESTED_MEGATRON_VERSIONS`; a
newer megatron-core may add a CUDA assumption, and the CPU test suite will show which.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

TESTED_MEGATRON_VERSIONS = ("0.16.0", "0.16.1")

_state = {"enabled": False, "mode": None}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how megatron passes torch.cuda.current_device() results.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args, kwargs = _strip_cuda_from_to(args, kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(args[0])
        return func(*args, **kwargs)


def _strip_cuda_from_to(args, kwargs):
    """``t.to("cuda")``, ``t.to(0)``, ``t.to("cuda", dtype)`` -> stay on the CPU."""
    if len(args) >= 2 and _is_cuda_device(args[1]):
        args = (args[0], "cpu") + tuple(args[2:])
    return args, kwargs


def _cuda_type_name(tensor: torch.Tensor) -> str:
    # clip_grads asserts grads are 'torch.cuda.FloatTensor'; answer as if on CUDA.
    cpu_name = torch._C._TensorBase.type(tensor)
    return cpu_name.replace("torch.", "torch.cuda.", 1) if "cuda" not in cpu_name else cpu_name


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
            "pin megatron-core==0.16.1 or extend sept_megatron/compat.py.",
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
    mode = _CudaToCpuMode()
    mode.__enter__()  # for the life of the process: Megatron allocates lazily, anywhere
    _state.update(enabled=True, mode=mode)
    log.info("CPU mode: megatron-core CUDA calls are redirected to the CPU (gloo backend)")
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
