"""The conversion workflows behind ``tools/``: HF -> Megatron and the logit check.

Both run under torchrun (or as one process); every rank builds only its own stage. Each call
creates Megatron's groups and destroys them on return; a default process group the caller
created before the call is left up, so one launch can run several conversions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.convert.hf_import import HFTensorReader, load_hf_into_model, validate_hf_checkpoint
from sept_megatron.runtime import compat, distributed
from sept_megatron.trainer import checkpoint as ckpt_io
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.arch import ModelArch

log = logging.getLogger(__name__)


def _params_dtype(name: str, hf_config) -> torch.dtype:
    if name == "auto":
        return mdl.declared_dtype(hf_config) or torch.float32
    return mdl.resolve_dtype(name)


def launch_problems(tp: int, pp: int, world_size: int) -> list[str]:
    """The conversion runs one rank per model shard: exactly tp x pp processes."""
    if world_size == tp * pp:
        return []
    return [
        f"--tp x --pp = {tp * pp} but {world_size} processes were launched; use torchrun "
        f"--nproc-per-node={tp * pp}"
    ]


def _check_layout(arch: ModelArch, tp: int, pp: int) -> None:
    from sept_megatron.config import ConfigError, ParallelConfig, layout_problems

    errors = launch_problems(tp, pp, distributed.world_size_from_env())
    # The model's shapes against tp x pp only: at world tp x pp there is no data parallelism,
    # and a conversion has no batch to check.
    errors += layout_problems(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), tp * pp, arch)
    if errors:
        raise ConfigError("invalid layout:\n  " + "\n  ".join(errors))


def convert_hf_to_megatron(
    hf_dir: str, out_dir: str, *, tp: int, pp: int, dtype: str = "auto", vocab_divisible_by: int = 128
) -> str:
    """Every rank: build its stage, fill it from HF, write its shards; atomic on disk."""
    hf_config = load_hf_config(hf_dir)
    arch = arch_from_hf_config(hf_config)
    _check_layout(arch, tp, pp)
    params_dtype = _params_dtype(dtype, hf_config)
    reader = HFTensorReader(hf_dir)
    validate_hf_checkpoint(reader, arch, mdl.declared_dtype(hf_config))
    caller_owns_group = dist.is_initialized()
    distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp)
    try:
        from megatron.core import parallel_state as ps

        padded = mdl.padded_vocab_size(arch.vocab_size, vocab_divisible_by, tp)
        model = mdl.build_megatron_model(
            arch,
            tensor_parallel=tp,
            pipeline_parallel=pp,
            params_dtype=params_dtype,
            transformer_impl="local",
            padded_vocab=padded,
        )
        load_hf_into_model(
            model.chunks,
            reader,
            arch,
            padded_vocab=padded,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=tp,
        )
        meta = ckpt_io.CheckpointMeta(arch, padded, ckpt_io.torch_dtype_name(params_dtype), tp, pp)
        ckpt_io.save_checkpoint(out_dir, None, ckpt_io.model_sharded_state_dict(model.chunks), meta, hf_dir)
    finally:
        reader.close()
        distributed.shutdown(keep_process_group=caller_owns_group)
    if distributed.is_rank0():
        log.info("wrote %s (TP=%d PP=%d, %s)", out_dir, tp, pp, params_dtype)
    return out_dir


def load_megatron_checkpoint(
    ckpt_dir: str, *, tp: int, pp: int, transformer_impl: str = "local"
) -> mdl.MegatronModel:
    """Build this rank's stage at (tp, pp) and load a checkpoint written at any layout."""
    meta = ckpt_io.read_meta(ckpt_dir)
    if meta.padded_vocab % tp:
        raise ValueError(f"checkpoint padded vocab {meta.padded_vocab} is not divisible by TP={tp}")
    model = mdl.build_megatron_model(
        meta.arch,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        params_dtype=getattr(torch, meta.params_dtype),
        transformer_impl=transformer_impl,
        padded_vocab=meta.padded_vocab,
    )
    ckpt_io.load_sharded(ckpt_io.resolve_checkpoint(ckpt_dir), ckpt_io.model_sharded_state_dict(model.chunks))
    return model


def forward_logits(model: mdl.MegatronModel, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, vocab] on the last pipeline stage (None elsewhere), run through
    Megatron's pipeline schedule so PP > 1 works exactly as in training."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = tokens.to(distributed.compute_device())  # callers may hand over host token ids
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)
    mask = mdl.causal_mask(seq, device=tokens.device)

    def forward_step(data_iterator, chunk):
        output = chunk(next(data_iterator), positions, mask)
        return output, partial(_collect_logits, model.arch.vocab_size)

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter([tokens]) for _ in model.chunks] if len(model.chunks) > 1 else iter([tokens]),
        model=model.chunks if len(model.chunks) > 1 else model.chunks[0],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
        collect_non_loss_data=True,
    )
    return out[0] if out else None


def _collect_logits(vocab_size: int, output: torch.Tensor, non_loss_data: bool = True):
    return mdl.gather_vocab_logits(output)[..., :vocab_size].float()


def check_logits(
    hf_dir: str, ckpt_dir: str, *, tp: int | None = None, pp: int | None = None, seq_len: int = 32
) -> LogitCheck | None:
    """Compare transformers' and Megatron's logits on the compute device (rank 0 gets the
    result, other ranks None). Megatron's stages are freed before the HF reference is loaded
    on the last stage's device, so the check needs no more memory than either model alone."""
    meta = ckpt_io.read_meta(ckpt_dir)
    tp, pp = tp or meta.tensor_parallel, pp or meta.pipeline_parallel
    dtype = getattr(torch, meta.params_dtype)
    caller_owns_group = dist.is_initialized()
    env = distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp)
    try:
        device = distributed.compute_device()
        tokens = probe_tokens(hf_dir, meta.arch.vocab_size, seq_len).to(device)
        model = load_megatron_checkpoint(ckpt_dir, tp=tp, pp=pp)
        for chunk in model.chunks:
            chunk.eval()
        with torch.no_grad():
            megatron_logits = forward_logits(model, tokens)
        del model
        # [max |diff|, max |hf logit|], reduced to rank 0 from the last stage.
        stats = torch.zeros(2, device=device)
        if megatron_logits is not None:
            stats.copy_(_compare_with_hf(hf_dir, dtype, tokens, megatron_logits))
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    finally:
        distributed.shutdown(keep_process_group=caller_owns_group)
    if env.rank != 0:
        return None
    return LogitCheck(max_abs_diff=float(stats[0]), max_abs_logit=float(stats[1]), dtype=dtype)


def _compare_with_hf(
    hf_dir: str, dtype: torch.dtype, tokens: torch.Tensor, megatron_logits: torch.Tensor
) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with compat.suspended():  # plain transformers: no Megatron redirect needed
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, local_files_only=True)
        hf = hf.to(tokens.device).eval()
        with torch.no_grad():
            hf_logits = hf(tokens).logits.float()
        diff = (hf_logits - megatron_logits).abs().max()
        return torch.stack([diff, hf_logits.abs().max()])


@dataclass(frozen=True)
class LogitCheck:
    """How far Megatron's logits are from transformers' on the probe tokens."""

    max_abs_diff: float
    max_abs_logit: float
    dtype: torch.dtype

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-12)

    def default_tolerance(self) -> tuple[str, float]:
        """fp32: 1e-4 absolute. bf16/fp16: both sides round every matmul to 8 (11) mantissa
        bits in different orders, so the bar is relative to the logits' scale: 3e-2 of the
        largest |logit| (bf16's unit roundoff is 3.9e-3; errors accumulate over layers)."""
        if self.dtype == torch.float32:
            return "absolute", 1e-4
        return "relative", 3e-2

    def passes(self, tolerance: float | None = None) -> bool:
        if tolerance is not None:
            return self.max_abs_diff <= tolerance
        kind, bar = self.default_tolerance()
        return (self.max_abs_diff if kind == "absolute" else self.relative_diff) <= bar


PROBE_PROMPTS = (
    "What is 12 + 35? Let's think step by step.",
    "Solve for x: 2x + 3 = 11.",
    "The derivative of x^2 is",
)


def probe_tokens(hf_dir: str, vocab_size: int, seq_len: int) -> torch.Tensor:
    """Tokenized prompts (same length) when the checkpoint has a tokenizer, random ids otherwise."""
    has_tokenizer = any(
        os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer.model")
    )
    if has_tokenizer:
        from sept_megatron.data import load_tokenizer

        tok = load_tokenizer(hf_dir)
        ids = [tok(p)["input_ids"] for p in PROBE_PROMPTS]
        length = min(seq_len, min(len(i) for i in ids))
        return torch.tensor([i[:length] for i in ids])
    return torch.randint(
        0, vocab_size, (len(PROBE_PROMPTS), seq_len), generator=torch.Generator().manual_seed(0)
    )
