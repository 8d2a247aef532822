"""The SGLang rollout backend, colocated: an in-process ``sglang.Engine`` per engine group.

Placement. Every trainer GPU also belongs to one engine of ``rollout.engine_tp`` GPUs (the
engine's own tensor parallelism, independent of Megatron's TP/PP). An engine group is a block
of consecutive global ranks on one node; its first rank, the *owner*, starts
``sglang.Engine(tp_size=engine_tp, base_gpu_id=<owner's local GPU>, enable_memory_saver=True,
skip_tokenizer_init=True, ...)``, whose scheduler processes run on the group's GPUs. Only the
owner generates; every rank of the group takes part in weight updates.

Data path of a weight sync (one bucket, ``rollout.bucket_size_mb``): each rank of the group holds
the same full HF-named tensors on its own GPU; it packs them with SGLang's own
``FlattenedTensorBucket`` (one contiguous byte buffer plus metadata) and serialises that with
SGLang's ``MultiprocessingSerializer`` after ``monkey_patch_torch_reductions`` (CUDA tensors
travel as CUDA-IPC handles keyed by device UUID, so nothing is copied through the host). The
payloads are gathered to the owner in group-rank order (= engine TP rank order), and the owner
calls ``Engine.update_weights_from_tensor(load_format="flattened_bucket")``: SGLang's TP rank
``i`` opens payload ``i``, which lives on its own GPU. The whole sync sits between
``begin_weight_update()`` and ``end_weight_update()`` (required since sglang 0.5.21; the end
finalises quantised layouts, e.g. FP8), and the radix cache is flushed once at the end.

Memory per round (the loop's order): generate -> :meth:`release_memory` (weights, KV cache and
CUDA graphs are paused by SGLang's memory saver) -> train -> :meth:`update_weights` (resumes the
weights first, then loads) -> :meth:`resume_memory` (KV cache and CUDA graphs). Send buffers are
allocated by this (trainer) process, never inside the memory saver's region, which lives in
SGLang's scheduler processes; ``torch.cuda.ipc_collect()`` after each bucket lets the trainer's
caching allocator reuse a buffer once SGLang has dropped its IPC reference.

Imported lazily (only ``rollout.backend=sglang`` loads it); SGLang itself is imported only when
an engine is started, and its version is checked against :data:`SGLANG_VERSION` first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sept_megatron.data import load_tokenizer
from sept_megatron.rollout.base import (
    Generation,
    SamplingParams,
    check_prompts,
)
from sept_megatron.rollout.sglang_memory import SGLangMemory
from sept_megatron.rollout.sglang_requests import (
    check_sglang_version,
    group_generations,
    request_sampling_params,
    stop_token_ids,
)

logger = logging.getLogger(__name__)

MEMORY_WEIGHTS, MEMORY_KV_CACHE, MEMORY_CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
"""SGLang's memory-saver tags (``sglang.srt.constants.GPU_MEMORY_TYPE_*``)."""


def fp8_quantization_config() -> dict:
    """What ``rollout.weights=fp8`` starts the engine with: 128x128 blockwise e4m3 weights with
    float32 ``weight_scale_inv`` per block, the same ``quantization_config`` the FP8 export
    writes (read by SGLang's ``Fp8Config.from_config``)."""
    from sept_megatron.convert.fp8 import hf_quantization_config

    return hf_quantization_config()


# --- the package ------------------------------------------------------------------------
def import_sglang():
    """``import sglang`` after the version check (its import is slow and pulls CUDA kernels)."""
    check_sglang_version()
    import sglang

    return sglang


# --- engine start-up ----------------------------------------------------------------------
def engine_kwargs(
    model_path: str,
    *,
    engine_tp: int = 1,
    base_gpu_id: int = 0,
    mem_fraction_static: float = 0.5,
    seed: int = 0,
    dtype: str = "bfloat16",
    load_format: str = "auto",
    deterministic: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine`` (= ``sglang.srt.server_args.ServerArgs`` fields).

    ``sampling_defaults="openai"``: without it SGLang fills unset sampling fields from the
    checkpoint's generation_config.json (Qwen ships top_k=20, repetition_penalty=1.05), so
    rollouts would not sample the distribution SePT's tau_s asks for. ``deterministic`` turns on
    SGLang's deterministic inference, the only mode in which per-request ``sampling_seed`` is
    honoured (it costs throughput). ``cuda_graph_backend_prefill="disabled"``: breakable
    prefill graphs refuse memory-saver mode once SGLANG_MEMORY_SAVER_CUDA_GRAPH is on, which
    :mod:`sept_megatron.rollout.sglang_env` sets so that CUDA-graph memory is released too.
    """
    return dict(
        model_path=model_path,
        tp_size=engine_tp,
        base_gpu_id=base_gpu_id,
        enable_memory_saver=True,
        cuda_graph_backend_prefill="disabled",
        mem_fraction_static=mem_fraction_static,
        skip_tokenizer_init=True,
        random_seed=seed,
        dtype=dtype,
        load_format=load_format,
        sampling_defaults="openai",
        enable_deterministic_inference=deterministic,
    )


def prepare_fp8_model_dir(hf_path: str, out_dir: str) -> str:
    """A model dir that starts SGLang with FP8 (128x128 blockwise) linear layers.

    Only the configs are written (config.json gains ``quantization_config``); the engine
    starts with ``load_format="dummy"`` and gets real weights from the first sync, which the
    FP8 bucket transform quantises on the trainer side. Returns ``out_dir``.
    """
    source = Path(hf_path)
    config = json.loads((source / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(
            f"{hf_path}/config.json already has a quantization_config; "
            "rollout.weights=fp8 needs the unquantised checkpoint as model.hf_path"
        )
    config["quantization_config"] = fp8_quantization_config()
    os.makedirs(out_dir, exist_ok=True)
    _write_atomically(Path(out_dir) / "config.json", json.dumps(config, indent=2).encode())
    if (source / "generation_config.json").is_file():
        _write_atomically(
            Path(out_dir) / "generation_config.json", (source / "generation_config.json").read_bytes()
        )
    return out_dir


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a private temporary file beside ``path`` and rename it into place: a reader
    (SGLang starting on another rank) sees the old file or the whole new one, never a part."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class SGLangRolloutEngine:
    """A :class:`~sept_megatron.rollout.base.RolloutEngine` over one colocated SGLang engine.

    Every rank of an engine group builds one; the owner (``ranks[0]``) starts ``sglang.Engine``.
    ``process_group`` spans ``ranks`` (None for a group of one). ``engine=`` injects an already
    started engine (or any object with ``sglang.Engine``'s methods; tests record calls with it).
    ``weights="fp8"`` starts SGLang from :func:`prepare_fp8_model_dir` (``fp8_dir``), with
    random weights until the first :meth:`update_weights`.
    """

    shard_sequences = 1  # per-request seeds: any split of a rollout draws the same samples

    def __init__(
        self,
        model_path: str | None = None,
        *,
        tokenizer=None,
        ranks: Sequence[int] = (0,),
        process_group=None,
        engine_tp: int | None = None,
        base_gpu_id: int | None = None,
        mem_fraction_static: float = 0.5,
        seed: int = 0,
        dtype: str = "bfloat16",
        weights: str = "native",
        fp8_dir: str | None = None,
        deterministic: bool = False,
        engine=None,
        progress: bool = True,
    ) -> None:
        self.ranks = tuple(int(r) for r in ranks)
        if not self.ranks or list(self.ranks) != list(range(self.ranks[0], self.ranks[0] + len(self.ranks))):
            raise ValueError(f"engine group ranks must be consecutive global ranks, got {self.ranks}")
        if engine_tp is not None and engine_tp != len(self.ranks):
            raise ValueError(
                f"rollout.engine_tp={engine_tp} but the engine group has {len(self.ranks)} ranks {self.ranks}"
            )
        if weights not in ("native", "fp8"):
            raise ValueError(f"rollout.weights={weights!r}: choose native or fp8")
        self.owner = self.ranks[0]
        self.process_group = process_group
        self.rank = dist.get_rank() if dist.is_initialized() else self.owner
        if self.rank not in self.ranks:
            raise ValueError(f"rank {self.rank} is not in its engine group {self.ranks}")
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.progress = progress
        self.tokenizer = (
            tokenizer if tokenizer is not None or model_path is None else load_tokenizer(model_path)
        )
        self.stop_ids = stop_token_ids(self.tokenizer, model_path) if self.tokenizer is not None else []
        self._released: set[str] = set()
        self._weights_stale = weights == "fp8"  # dummy weights until the first sync
        self.updates = 0  # completed update_weights calls (for logs and tests)
        self.engine = engine
        if self.is_owner and self.engine is None:
            if model_path is None:
                raise ValueError("SGLangRolloutEngine needs model_path (a local HF directory) or engine=")
            start_path, load_format = model_path, "auto"
            if weights == "fp8":
                # Never beside the model (a read-only store, shared by other jobs): the run
                # dir's (fp8_dir, see backend_kwargs) or a private temporary dir.
                start_path = prepare_fp8_model_dir(
                    model_path, fp8_dir or tempfile.mkdtemp(prefix="sept_fp8_engine_")
                )
                load_format = "dummy"
            gpu = (
                base_gpu_id
                if base_gpu_id is not None
                else (self.device.index if self.device is not None else 0)
            )
            _check_gpus(gpu, len(self.ranks))
            kwargs = engine_kwargs(
                start_path,
                engine_tp=len(self.ranks),
                base_gpu_id=gpu,
                mem_fraction_static=mem_fraction_static,
                seed=seed,
                dtype=dtype,
                load_format=load_format,
                deterministic=deterministic,
            )
            self.engine = import_sglang().Engine(**kwargs)
            logger.info(
                "SGLang engine started on GPUs %d..%d for ranks %s",
                gpu,
                gpu + len(self.ranks) - 1,
                self.ranks,
            )

    # --- the RolloutBackend class methods (rollout.backend=sglang) --------------------------
    @classmethod
    def check_config(cls, rollout, *, arch=None) -> list[str]:
        problems = []
        if rollout.hf_static_cache:
            problems.append(
                "rollout.hf_static_cache=true is an option of the hf backend, not "
                "rollout.backend=sglang; set rollout.hf_static_cache=false"
            )
        if rollout.placement == "disaggregated" and not rollout.server_urls:
            problems.append(
                "rollout.placement=disaggregated needs the servers' addresses in "
                "rollout.server_urls (e.g. rollout.server_urls=[http://node7:30000])"
            )
        if rollout.weights == "fp8" and arch is not None and rollout.engine_tp >= 1:
            from sept_megatron.convert.fp8 import sglang_block_problems

            problems += [
                f"rollout.weights=fp8: {problem}; choose another rollout.engine_tp or rollout.weights=native"
                for problem in sglang_block_problems(arch, rollout.engine_tp)
            ]
        return problems

    @classmethod
    def prepare_process(cls, rollout) -> None:
        """Every rank exports SGLang's process environment before any communicator exists
        (:mod:`sept_megatron.rollout.sglang_env`): only engine owners construct
        ``sglang.Engine``, which would otherwise set NCCL variables on them alone."""
        from sept_megatron.rollout.sglang_env import set_sglang_environment

        set_sglang_environment()

    @classmethod
    def config_kwargs(
        cls,
        rollout,
        *,
        tokenizer,
        seed: int,
        device: str,
        dtype,
        progress: bool,
        placement=None,
        run_dir: str | None = None,
    ) -> dict:
        """SGLang places itself (its engine group's GPUs) and runs in bf16 unless
        ``rollout.weights=fp8``; disaggregated, the servers in ``rollout.server_urls``."""
        del dtype
        if rollout.placement == "disaggregated":
            # The weight broadcast to the servers runs over the trainer's device: NCCL on GPUs
            # (gloo only where the trainer computes on the CPU, i.e. tests).
            return dict(
                placement="disaggregated",
                server_urls=list(rollout.server_urls),
                tokenizer=tokenizer,
                weights=rollout.weights,
                weight_backend="nccl" if device.startswith("cuda") else "gloo",
                timeout_s=rollout.timeout_minutes * 60.0,
            )
        kwargs = dict(
            tokenizer=tokenizer,
            engine_tp=rollout.engine_tp,
            seed=seed,
            mem_fraction_static=rollout.mem_fraction_static,
            weights=rollout.weights,
            progress=progress,
        )
        if rollout.weights == "fp8" and run_dir is not None:
            kwargs["fp8_dir"] = os.path.join(run_dir, "sglang_fp8_model")
        if placement is not None:
            # The group's object exchanges (payload handles, replies) and waits run over gloo.
            kwargs |= dict(
                ranks=placement.mine.ranks, process_group=placement.cpu_group or placement.process_group
            )
        return kwargs

    @classmethod
    def memory_model(cls) -> SGLangMemory:
        """SGLang 0.5.21's static pool and workspace (:mod:`.sglang_memory`)."""
        return SGLangMemory()

    @classmethod
    def build(cls, model_path: str | None = None, **kwargs):
        """SGLang is a GPU-only optional extra; say how to get it, or how to do without it.
        ``placement="disaggregated"`` builds the HTTP client of the servers instead."""
        if importlib.util.find_spec("sglang") is None:
            raise ImportError(
                "rollout.backend=sglang needs SGLang, which is not installed: "
                "`pip install sept_megatron[gpu]` on a CUDA machine, or use rollout.backend=hf on CPU"
            )
        if kwargs.pop("placement", "colocated") == "disaggregated":
            from sept_megatron.rollout.sglang_remote import SGLangRemoteEngine

            return SGLangRemoteEngine(kwargs.pop("server_urls"), model_path=model_path, **kwargs)
        return cls(model_path, **kwargs)

    @property
    def is_owner(self) -> bool:
        return self.rank == self.owner

    # --- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Generation]]:
        """``sampling.n`` generations per prompt, in prompt order (owner only)."""
        if not self.is_owner:
            raise RuntimeError(
                f"generate() runs on the engine owner (rank {self.owner}), not on rank {self.rank}"
            )
        if self._released:
            raise RuntimeError(
                f"SGLang memory {sorted(self._released)} is released; call "
                "resume_memory() (after update_weights()) before generate()"
            )
        if self._weights_stale:
            raise RuntimeError(
                "the SGLang engine holds no valid weights (released, or an FP8 "
                "engine before its first sync); call update_weights() first"
            )
        check_prompts(prompts)
        if not prompts:
            return []
        prompt_of, params = request_sampling_params(sampling, self.stop_ids, len(prompts))
        outputs = self.engine.generate(
            input_ids=[list(map(int, prompts[i])) for i in prompt_of], sampling_params=params
        )
        return group_generations(outputs, prompt_of, len(prompts), sampling, self.tokenizer)

    # --- weights: the IPCWeightEngine capability (weight_sync.sglang_ipc drives it) ---------
    def begin_weight_update(self):
        """Resume the weights if released (their values are stale until loaded), then open an
        update session on the owner; the owner's reply (None on other ranks)."""
        if MEMORY_WEIGHTS in self._released:
            self._owner_call("resume_memory_occupation", tags=[MEMORY_WEIGHTS])
            self._released.discard(MEMORY_WEIGHTS)
            self._weights_stale = True
        return self._owner_call("begin_weight_update")

    def load_payloads(self, payloads: list[bytes]):
        """One bucket, payload ``i`` for engine TP rank ``i`` (owner only; None elsewhere)."""
        return self._owner_call(
            "update_weights_from_tensor",
            named_tensors=payloads,
            load_format="flattened_bucket",
            flush_cache=False,
        )

    def end_weight_update(self):
        return self._owner_call("end_weight_update")

    def weights_loaded(self) -> None:
        """The session succeeded: flush the radix cache once, the weights are valid."""
        self._owner_call("flush_cache")
        self._weights_stale = False
        self.updates += 1

    def _owner_call(self, method: str, **kwargs):
        """Call an ``sglang.Engine`` method on the owner; other ranks get None."""
        if not self.is_owner:
            return None
        return getattr(self.engine, method)(**kwargs)

    # --- memory ----------------------------------------------------------------------------
    def release_memory(self) -> None:
        """Pause weights, KV cache and CUDA graphs (SGLang's memory saver) while Megatron trains."""
        if not self._released:
            self._owner_call("release_memory_occupation", tags=None)
            self._released = {MEMORY_WEIGHTS, MEMORY_KV_CACHE, MEMORY_CUDA_GRAPH}

    def resume_memory(self) -> None:
        """Take back what is still released: KV cache and CUDA graphs after
        :meth:`update_weights`; also the weights (stale until the next sync) if no sync ran."""
        if MEMORY_WEIGHTS in self._released:
            self._owner_call("resume_memory_occupation", tags=[MEMORY_WEIGHTS])
            self._weights_stale = True
        rest = [tag for tag in (MEMORY_KV_CACHE, MEMORY_CUDA_GRAPH) if tag in self._released]
        if rest:
            self._owner_call("resume_memory_occupation", tags=rest)
        self._released.clear()

    def shutdown(self) -> None:
        if self.is_owner and self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def _check_gpus(base_gpu_id: int, engine_tp: int) -> None:
    if torch.cuda.is_available() and base_gpu_id + engine_tp > torch.cuda.device_count():
        raise ValueError(
            f"rollout.engine_tp={engine_tp} from GPU {base_gpu_id} needs GPUs up to "
            f"{base_gpu_id + engine_tp - 1}, but {torch.cuda.device_count()} are "
            "visible; an engine must fit on one node"
        )
