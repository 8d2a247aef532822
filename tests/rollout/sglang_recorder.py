"""A stand-in for a *started* ``sglang.Engine`` that records calls and runs SGLang's receiver.

Starting a real engine needs CUDA and SGLang's kernels. This recorder takes the place of the
engine's process boundary only: each call is checked against the installed
``sglang.Engine`` method's signature, the weight-update session rule of SGLang's scheduler
(``SchedulerWeightUpdaterManager``: a load outside begin/end fails with ``(False, msg)``) is
enforced, and every payload goes through SGLang's own receiving code, taken from the installed
source (see sglang_source.py): ``Engine._serialize_tensors_per_rank`` ->
``BaseTpWorker.deserialize_own_rank`` (one TP rank each) ->
``WeightUpdater._update_weights_from_flattened_bucket`` -> ``model.load_weights``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from sglang_source import sglang_definitions, sglang_signature

ENGINE_PY = "srt/entrypoints/engine.py"


def sglang_receiver() -> dict:
    """SGLang's receiving functions, bound to real SGLang objects."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    namespace = {
        "MultiprocessingSerializer": MultiprocessingSerializer,
        "monkey_patch_torch_reductions": monkey_patch_torch_reductions,
        "normalize_serialized_named_tensor_payloads": normalize_serialized_named_tensor_payloads,
        "FlattenedTensorBucket": FlattenedTensorBucket,
        "FlattenedTensorMetadata": FlattenedTensorMetadata,
        "cast": lambda _type, value: value,
        "List": list,
        "SerializedTensorPayload": bytes,
    }
    sglang_definitions(ENGINE_PY, ["Engine._serialize_tensors_per_rank"], namespace)
    sglang_definitions("srt/managers/tp_worker.py", ["BaseTpWorker.deserialize_own_rank"], namespace)
    sglang_definitions(
        "srt/model_executor/model_runner_components/weight_updater.py",
        ["WeightUpdater._update_weights_from_flattened_bucket"],
        namespace,
    )
    return namespace


class LoadRecorder:
    """The model side of ``load_weights``: keeps an independent copy of what SGLang loads."""

    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}
        self.batches = 0

    def load_weights(self, named_tensors):
        self.batches += 1
        for name, tensor in named_tensors:
            self.loaded[name] = tensor.clone()


@contextmanager
def torch_reductions_restored():
    """Undo SGLang's ``monkey_patch_torch_reductions`` when a block is done.

    SGLang's receiver applies it (process-wide, once), and the patched ``reduce_tensor`` only
    handles CUDA tensors: a CPU tensor pickled afterwards in the same process fails. In SGLang the
    receiver is its own process; a test that runs it in-process puts torch back afterwards.
    """
    from torch.multiprocessing import reductions

    saved = (reductions.reduce_tensor, reductions.rebuild_cuda_tensor)
    was_patched = hasattr(reductions, "_reduce_tensor_original")
    try:
        yield
    finally:
        if not was_patched and hasattr(reductions, "_reduce_tensor_original"):
            reductions.reduce_tensor, reductions.rebuild_cuda_tensor = saved
            del reductions._reduce_tensor_original, reductions._rebuild_cuda_tensor_original
            reductions.init_reductions()


def receive(payloads: list[bytes], tp_rank: int, receiver: dict | None = None) -> dict[str, torch.Tensor]:
    """What SGLang TP rank ``tp_rank`` loads from an ``update_weights_from_tensor`` payload list."""
    receiver = receiver or sglang_receiver()
    raw = receiver["_serialize_tensors_per_rank"](None, payloads, "flattened_bucket")
    worker = SimpleNamespace(model_runner=SimpleNamespace(tp_rank=tp_rank))
    with torch_reductions_restored():
        bucket = receiver["deserialize_own_rank"](worker, raw)
    model = LoadRecorder()
    updater = SimpleNamespace(get_model=lambda: model)
    assert receiver["_update_weights_from_flattened_bucket"](updater, bucket) == (True, "Success")
    return model.loaded


def set_envs_like_engine_construction(environ=None) -> None:
    """The process-environment side effects of constructing ``sglang.Engine`` in sglang 0.5.21
    with our arguments: ``srt/entrypoints/engine.py``, ``_set_envs_and_config`` (run by
    ``Engine.__init__`` in the constructing process), with ``enable_symm_mem``,
    ``enable_nccl_nvls`` and ``dcp_size > 1`` off and one node: NCCL_CUMEM_ENABLE and
    NCCL_NVLS_ENABLE become "0" unless already set, CUDA_DEVICE_MAX_CONNECTIONS is always "8"."""
    env = os.environ if environ is None else environ
    if "NCCL_CUMEM_ENABLE" not in env:
        env["NCCL_CUMEM_ENABLE"] = "0"
    if "NCCL_NVLS_ENABLE" not in env:
        env["NCCL_NVLS_ENABLE"] = "0"
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "8"


class RecordingEngine:
    """Records ``sglang.Engine`` calls (validated against the real signatures). Constructing
    it has ``sglang.Engine``'s environment side effects (:func:`set_envs_like_engine_construction`)."""

    def __init__(self, tp_size: int = 1, outputs=None):
        set_envs_like_engine_construction()
        self.calls: list[tuple[str, dict]] = []
        self.tp_size = tp_size
        self.loaded: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
        self.outputs = outputs  # callable(input_ids, sampling_params) -> SGLang output dicts
        self.session_open = False
        self.receiver = sglang_receiver()

    def _record(self, method: str, *args, **kwargs) -> None:
        bound = sglang_signature(ENGINE_PY, f"Engine.{method}").bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.calls.append((method, {k: v for k, v in bound.arguments.items() if k != "self"}))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def begin_weight_update(self, *args, **kwargs):
        self._record("begin_weight_update", *args, **kwargs)
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    def end_weight_update(self, *args, **kwargs):
        self._record("end_weight_update", *args, **kwargs)
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"

    def update_weights_from_tensor(self, *args, **kwargs):
        self._record("update_weights_from_tensor", *args, **kwargs)
        arguments = self.calls[-1][1]
        if not self.session_open:
            return False, (
                "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
            )
        assert arguments["load_format"] == "flattened_bucket"
        payloads = arguments["named_tensors"]
        assert len(payloads) == self.tp_size, "one payload per engine TP rank"
        for tp_rank in range(self.tp_size):
            self.loaded[tp_rank].update(receive(payloads, tp_rank, self.receiver))
        return True, "Success"

    def flush_cache(self, *args, **kwargs):
        self._record("flush_cache", *args, **kwargs)

    def release_memory_occupation(self, *args, **kwargs):
        self._record("release_memory_occupation", *args, **kwargs)

    def resume_memory_occupation(self, *args, **kwargs):
        self._record("resume_memory_occupation", *args, **kwargs)

    def generate(self, *args, **kwargs):
        self._record("generate", *args, **kwargs)
        arguments = self.calls[-1][1]
        return self.outputs(arguments["input_ids"], arguments["sampling_params"])


# --- SGLang's receiver in another process, as its scheduler runs ------------------------------
def _receive_child(conn, rounds: list[list[bytes]], tp_rank: int) -> None:
    try:
        receiver = sglang_receiver()
        results = []
        for payloads in rounds:
            merged = {}
            for payload in payloads:  # one update_weights_from_tensor call per payload
                merged |= {name: as_bytes(t) for name, t in receive([payload], tp_rank, receiver).items()}
            results.append(merged)
        conn.send(results)
    except BaseException as error:  # report, don't hang the parent
        conn.send(error)
        raise


def receive_in_process(
    rounds: list[list[bytes]], tp_rank: int = 0, timeout_s: float = 300
) -> list[dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """Unpack payloads in a spawned process (a new interpreter, like SGLang's scheduler). Each
    round is a list of single-rank payloads (one per bucket); returns, per round,
    name -> (dtype, shape, raw bytes) of every tensor SGLang TP rank ``tp_rank`` loaded."""
    context = torch.multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_receive_child, args=(child, rounds, tp_rank))
    process.start()
    try:
        if not parent.poll(timeout_s):
            raise TimeoutError(f"SGLang receiver process sent nothing in {timeout_s} s")
        result = parent.recv()
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    if isinstance(result, BaseException):
        raise result
    return result


def as_bytes(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return str(tensor.dtype), tuple(tensor.shape), tensor.contiguous().view(torch.uint8).numpy().tobytes()
