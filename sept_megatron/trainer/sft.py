"""The SFT step of SePT, through Megatron-Core's own schedule, DDP and optimizer.

Loss (the paper's, and plain SFT): token-mean negative log-likelihood of the response tokens,
prompt masked, the first EOS included, logits divided by the training temperature tau_t
(``train.mode`` em and grpo swap in their own per-token loss, :mod:`sept_megatron.trainer.losses`).
Which tokens share one mean is ``train.loss_aggregation``:

* ``minibatch_token_mean``: every response token of the mini-batch, across micro-batches and
  data-parallel ranks: the loss function returns (sum, token count) and Megatron's
  ``calculate_per_token_loss`` path divides the gradients by the global token count in
  ``finalize_model_grads``;
* ``microbatch_mean`` (the reference's: verl's ``token-mean``): each micro-batch's own token
  mean, which Megatron's schedule divides by the number of micro-batches and DDP averages over
  data-parallel ranks. With micro-batches of different token counts the two differ.

One mini-batch = one optimizer step (AdamW via ``get_megatron_optimizer``, gradient clipping).
The LR warms up linearly from 0, then stays constant (or follows a cosine to 0, the offline
ablation's SFT schedule); the scheduler steps once per optimizer step or, as verl's SePT
trainer does, once per round (``train.lr_schedule_interval``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from sept_megatron.config import TrainConfig
from sept_megatron.runtime.distributed import compute_device
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.fp8 import token_multiple
from sept_megatron.trainer.fused_adam import use_fused_adam
from sept_megatron.trainer.losses import LogProbCollector, TokenLoss, loss_for_mode


@dataclass(frozen=True)
class Sample:
    """One (prompt, self-generated response) pair; response ends with EOS unless truncated."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 0.0
    """GRPO: the answer's group-normalised advantage, the same for all its tokens."""


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] prompt + response, right-padded
    labels: torch.Tensor  # [b, s] next token
    loss_mask: torch.Tensor  # [b, s] 1 where the label is a response token
    positions: torch.Tensor
    attention_mask: torch.Tensor
    advantages: torch.Tensor | None = None  # [b, 1] per-sequence advantage (GRPO)
    old_log_probs: torch.Tensor | None = None  # [b, s] log-probs before the round's updates
    ref_log_probs: torch.Tensor | None = None  # [b, s] the initial model's (GRPO's KL)


def make_micro_batch(samples: Sequence[Sample], seq_len: int, pad_id: int) -> MicroBatch:
    """Right-pad to ``seq_len``: with a causal mask, padding after a sequence changes nothing."""
    tokens = torch.full((len(samples), seq_len + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), seq_len + 1), dtype=torch.float)
    for row, s in enumerate(samples):
        ids = s.prompt_ids + s.response_ids
        tokens[row, : len(ids)] = torch.tensor(ids)
        # Position t predicts token t+1: response token j sits at len(prompt) + j.
        mask[row, len(s.prompt_ids) : len(ids)] = 1.0
    positions = torch.arange(seq_len).unsqueeze(0).expand(len(samples), -1)
    advantages = torch.tensor([[s.advantage] for s in samples], dtype=torch.float)
    return MicroBatch(
        tokens[:, :-1].contiguous(),
        tokens[:, 1:].contiguous(),
        mask[:, 1:].contiguous(),
        positions,
        mdl.causal_mask(seq_len),
        advantages,
    )


def padded_length(samples: Sequence[Sample], multiple: int = 8) -> int:
    """One length for the whole mini-batch: pipeline p2p needs a fixed activation shape."""
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples) - 1
    return max(multiple, math.ceil(longest / multiple) * multiple)


def _to_device(mb: MicroBatch, device) -> MicroBatch:
    return MicroBatch(
        *(
            None if t is None else t.to(device)
            for t in (
                mb.tokens,
                mb.labels,
                mb.loss_mask,
                mb.positions,
                mb.attention_mask,
                mb.advantages,
                mb.old_log_probs,
                mb.ref_log_probs,
            )
        )
    )


def scheduler_steps(cfg: TrainConfig, total_steps: int, total_rounds: int | None) -> int:
    """How many times the LR scheduler will step: optimizer steps, or rounds."""
    if cfg.lr_schedule_interval == "optimizer_step":
        return total_steps
    if total_rounds is None:
        raise ValueError("train.lr_schedule_interval=round: SFTTrainer needs total_rounds")
    return total_rounds


def _forward_step(loss: TokenLoss, data_iterator, chunk):
    mb = next(data_iterator)
    output = chunk(mb.tokens, mb.positions, mb.attention_mask)
    return output, partial(loss, mb)


class SFTTrainer:
    """Megatron DDP + optimizer + LR schedule around this rank's model stage(s)."""

    def __init__(
        self,
        model: mdl.MegatronModel,
        train_cfg: TrainConfig,
        *,
        total_steps: int,
        use_distributed_optimizer: bool,
        pad_id: int,
        total_rounds: int | None = None,
    ):
        from megatron.core import parallel_state as ps

        self.model, self.cfg, self.pad_id = model, train_cfg, pad_id
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.device = compute_device()
        # Before DDP exists: with per-token loss DDP sums grads instead of averaging them.
        model.config.calculate_per_token_loss = train_cfg.loss_aggregation == "minibatch_token_mean"
        self.chunks = _wrap_ddp(model, use_distributed_optimizer and self.dp_size > 1)
        self.optimizer = _build_optimizer(
            self.chunks, model.config, train_cfg, use_distributed_optimizer and self.dp_size > 1
        )
        use_fused_adam(self.optimizer, self.device)  # torch's fallback AdamW: fused on CUDA
        self.scheduler = _build_scheduler(
            self.optimizer, train_cfg, scheduler_steps(train_cfg, total_steps, total_rounds)
        )
        _install_schedule_hooks(model.config, self.chunks, self.optimizer)
        self.loss = loss_for_mode(
            train_cfg.mode, model.arch.vocab_size, train_cfg.tau_train, train_cfg.kl_coef
        )
        self.steps = 0
        self.skips = SkippedUpdates(train_cfg.max_skipped_updates)

    # -- data layout -------------------------------------------------------------------------
    def _micro_batches(
        self, mini_batch: Sequence[Sample], old_log_probs=None, ref_log_probs=None
    ) -> tuple[list[MicroBatch], int]:
        """This DP rank's share of a mini-batch, cut into micro-batches of one length (with
        their old log-probs from :meth:`log_probs`, which cut the mini-batch the same way)."""
        seq_len = padded_length(mini_batch, token_multiple(self.model.config))
        mine = list(mini_batch[self.dp_rank :: self.dp_size])
        size = self.cfg.micro_batch_size
        mbs = [
            _to_device(make_micro_batch(mine[i : i + size], seq_len, self.pad_id), self.device)
            for i in range(0, len(mine), size)
        ]
        for mb, old in zip(mbs, old_log_probs or ()):
            mb.old_log_probs = old
        for mb, ref in zip(mbs, ref_log_probs or ()):
            mb.ref_log_probs = ref
        return mbs, seq_len

    def _run_schedule(
        self,
        mini_batch: Sequence[Sample],
        forward_only: bool,
        loss: TokenLoss | None = None,
        old_log_probs=None,
        ref_log_probs=None,
        chunks=None,
    ) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = chunks or self.chunks
        mbs, seq_len = self._micro_batches(mini_batch, old_log_probs, ref_log_probs)
        iterators = [iter(mbs) for _ in chunks]
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss or self.loss),
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(mbs),
            seq_length=seq_len,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only,
        )

    # -- steps ---------------------------------------------------------------------------------
    def step(self, mini_batch: Sequence[Sample], old_log_probs=None, ref_log_probs=None) -> dict[str, float]:
        """One optimizer step on one mini-batch; returns loss, grad norm, lr, token count (and
        the loss's extra reports, e.g. GRPO's ``train/clip_fraction``, ``train/entropy``)."""
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run_schedule(
            mini_batch, forward_only=False, old_log_probs=old_log_probs, ref_log_probs=ref_log_probs
        )
        loss, tokens = _reduce_losses(losses)
        ok, grad_norm = step_if_finite(self.optimizer, loss)
        # As Megatron-LM, a skipped update does not advance the LR schedule; a schedule counted
        # in rounds steps in end_round instead.
        if ok and self.cfg.lr_schedule_interval == "optimizer_step":
            self.scheduler.step(increment=1)
        self.steps += 1
        self.skips.record(ok, loss, self.steps)
        extras = {
            f"train/{key}": value
            for key, value in _reduce_extra_reports(losses, self.loss.report_keys[1:]).items()
        }
        return {
            "train/loss": loss,
            "train/grad_norm": float(grad_norm or 0.0),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/response_tokens": tokens,
            "train/update_skipped": float(not ok),
            **extras,
        }

    @torch.no_grad()
    def log_probs(self, mini_batch: Sequence[Sample], chunks=None) -> list:
        """Per-token log-probs of this rank's micro-batches of ``mini_batch`` under the current
        weights (GRPO's old policy, one forward pass), or under ``chunks`` (another model of the
        same layout: the frozen initial model of GRPO's KL); ``None`` each on stages without a
        head. Pass the result to :meth:`step` with the same ``mini_batch``."""
        for chunk in chunks or self.chunks:
            chunk.eval()
        collector = LogProbCollector(self.model.arch.vocab_size, self.cfg.tau_train)
        reports = self._run_schedule(mini_batch, forward_only=True, loss=collector, chunks=chunks)
        return [r["log_probs"] for r in reports] or None

    def end_round(self) -> None:
        """Called once after each round's optimizer steps: the scheduler's step when it counts
        rounds (verl's SePT trainer steps its LR scheduler once per round)."""
        if self.cfg.lr_schedule_interval == "round":
            self.scheduler.step(increment=1)

    @torch.no_grad()
    def evaluate_loss(self, samples: Sequence[Sample]) -> float:
        """Token-mean NLL of ``samples`` under the current weights (no update)."""
        for chunk in self.chunks:
            chunk.eval()
        loss, _ = _reduce_losses(self._run_schedule(samples, forward_only=True))
        return loss


class NonFiniteTraining(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm."""


class SkippedUpdates:
    """Consecutive skipped updates; past ``limit`` the run stops rather than train on."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.last_finite_loss = limit, 0, None

    def record(self, updated: bool, loss: float, step: int) -> None:
        if updated:
            self.consecutive = 0
            self.last_finite_loss = loss
            return
        self.consecutive += 1
        if math.isfinite(loss):
            self.last_finite_loss = loss
        if self.consecutive >= self.limit:
            raise NonFiniteTraining(
                f"step {step}: {self.consecutive} consecutive optimizer steps had a non-finite "
                f"loss or gradient norm (last loss {loss}) and were skipped "
                f"(train.max_skipped_updates={self.limit}); last finite loss "
                f"{self.last_finite_loss}. Lower train.lr, check the data, or resume from an "
                "earlier checkpoint"
            )


@torch.no_grad()
def step_if_finite(optimizer, loss: float) -> tuple[bool, float]:
    """Megatron's optimizer step (``ChainedOptimizer.step``: prepare grads, global grad norm,
    clip, step), skipped when the loss or the grad norm is not finite. Megatron itself skips
    only on the fp16 loss scaler's inf check; in fp32/bf16 a NaN norm would turn the clip
    coefficient, and with it every weight, into NaN. Every rank decides alike: the loss is
    reduced over DP and PP, the norm over the model-parallel group, found_inf over all."""
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()
    if found_inf:
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(grad_norm) and math.isfinite(loss)):
        return False, grad_norm
    parts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for part in parts:
        parameters = part.get_parameters()
        if getattr(part, "is_stub_optimizer", False) or not parameters:
            continue
        if part.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                parameters,
                max_norm=part.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return optimizer.step_with_ready_grads(), grad_norm


def _reduce_losses(losses: list[dict]) -> tuple[float, float]:
    """Sum (loss, tokens) over micro-batches, then over DP ranks; broadcast from the last stage
    so every rank reports the same number."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    # On the compute device: NCCL reduces only CUDA tensors (the H100 run crashed here once).
    total = torch.zeros(2, dtype=torch.float64, device=compute_device())
    for item in losses:
        total += item["lm loss"].detach().double()
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(total, src=last, group=ps.get_pipeline_model_parallel_group())
    return float(total[0] / max(total[1], 1.0)), float(total[1])


def _reduce_extra_reports(losses: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Token means of the loss's extra reports, over micro-batches and DP ranks, the same on
    every rank (``keys`` come from the loss, so stages without a head issue the same calls)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not keys:
        return {}
    total = torch.zeros(len(keys), 2, dtype=torch.float64, device=compute_device())
    for item in losses:
        total += torch.stack([item[key].detach().double() for key in keys])
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(total, src=last, group=ps.get_pipeline_model_parallel_group())
    return {key: float(row[0] / max(row[1], 1.0)) for key, row in zip(keys, total)}


def _wrap_ddp(model: mdl.MegatronModel, distributed_optimizer: bool) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer
    )
    wrapped = []
    for i, chunk in enumerate(model.chunks):
        module = Float16Module(model.config, chunk) if model.config.bf16 or model.config.fp16 else chunk
        # Bucketing only changes communication granularity; off for the first chunk as in Megatron-LM.
        wrapped.append(
            DistributedDataParallel(
                config=model.config, ddp_config=ddp_config, module=module, disable_bucketing=i > 0
            )
        )
    return wrapped


def _build_optimizer(chunks, model_config, cfg: TrainConfig, distributed_optimizer: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=final_lr(cfg),
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, chunks)


def final_lr(cfg: TrainConfig) -> float:
    """The LR after warmup and decay: ``lr`` when constant; 0 for the cosine (verl SFT's)."""
    return 0.0 if cfg.lr_decay_style == "cosine" else cfg.lr


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``warmup_steps``, or ``floor(warmup_ratio x total_steps)`` as verl's SFT trainer counts."""
    return cfg.warmup_steps if cfg.warmup_ratio is None else int(cfg.warmup_ratio * total_steps)


def _build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup from 0 to ``lr``, then constant (the paper's) or a cosine to 0 at
    ``total_steps`` (the offline ablation's SFT). ``total_steps`` counts scheduler steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = warmup_steps(cfg, total_steps)
    steps = max(total_steps, warmup + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=final_lr(cfg),
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )


def _install_schedule_hooks(config, chunks, optimizer) -> None:
    """What Megatron-LM's training loop sets so the schedule reduces grads and counts tokens."""
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync


OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""How the distributed optimizer's state is laid out in a checkpoint: Megatron's
``dp_reshardable`` (each rank saves its own buffers; the checkpoint reloads at another DP size,
the same TP x PP). Megatron's default when none is named, ``fully_sharded_model_space``, is
deprecated and, in megatron-core 0.16, fails to save at DP > 1 ("ShardedTensor.flattened_range
is not supported"); ``fully_reshardable`` cannot load into torch's Adam (its per-parameter
``step`` is not in the saved state). The model weights stay loadable at any layout."""


def trainer_sharded_state_dict(trainer: SFTTrainer) -> dict:
    """Model and optimizer shards for dist_checkpointing (loadable at another layout)."""
    from sept_megatron.trainer.checkpoint import model_sharded_state_dict

    model_sd = model_sharded_state_dict(trainer.model.chunks)
    optimizer_sd = trainer.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_CHECKPOINT_FORMAT)
    return {"model": model_sd, "optimizer": optimizer_sd}


def _allocate_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state yet, and without Apex or TE (CPU) its
    ``state_dict()``, which ``sharded_state_dict(is_loading=True)`` calls, reads the step count
    from that state. Allocate it by Megatron's own dummy step (zero gradients), as Megatron
    does before loading its FSDP format; the load then overwrites every value it wrote."""
    for part in _distributed_parts(optimizer):
        if not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()


def _distributed_parts(optimizer) -> list:
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return [part for part in parts if isinstance(part, DistributedOptimizer)]


def _unshare_adam_steps(optimizer) -> None:
    """Without Apex or TE, the distributed optimizer's ``load_state_dict`` gives every
    parameter's torch Adam state one shared ``step`` tensor, which each parameter's update
    then increments in place: the bias correction of every later step would be wrong (a
    resumed DP = 2 run drifted from the uninterrupted one on its first step). One per
    parameter again, as torch keeps them."""
    for part in _distributed_parts(optimizer):
        for state in part.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def load_trainer_state(trainer: SFTTrainer, ckpt_dir: str, scheduler_state: dict) -> None:
    """Restore model, optimizer and LR schedule from a training checkpoint."""
    from sept_megatron.trainer.checkpoint import load_sharded, model_sharded_state_dict

    model_sd = model_sharded_state_dict(trainer.model.chunks)
    _allocate_optimizer_state(trainer.optimizer)
    request = {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_CHECKPOINT_FORMAT
        ),
    }
    loaded = load_sharded(ckpt_dir, request)
    for i, chunk in enumerate(trainer.model.chunks):
        chunk.load_state_dict(loaded["model"][f"model{i}"], strict=False)
    with torch.no_grad():  # the distributed optimizer copies into views of the parameters
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(trainer.optimizer)
    use_fused_adam(trainer.optimizer, trainer.device)  # loading restored the saved groups' flags
    trainer.scheduler.load_state_dict(scheduler_state)
    trainer.steps = scheduler_state.get("num_steps", trainer.steps)
