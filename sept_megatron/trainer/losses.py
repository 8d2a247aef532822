"""The per-token losses of the three training modes, on vocab-parallel logits.

- **SFT** (SePT, offline, coupled): token NLL of the response at the training temperature.
- **EM-FT** (``train.mode=em``): the entropy of the model's next-token distribution at each of
  its own answer tokens, the reference's ``policy_loss_type=entropy_minimization`` with
  ``entropy_loss_coeff=1`` (SePT's ``examples/em_1e7_dsr.sh``).
- **GRPO** (``train.mode=grpo``): verl's PPO clipped policy gradient (``core_algos.
  compute_policy_loss`` at the commit the reference pins, 38d9a88: ratio = exp(log p - log
  p_old) with the log-ratio clamped to [-20, 20], clip range 0.2 on both sides, dual clip
  ``clip_ratio_c = 3`` for negative advantages) on group-normalised outcome advantages
  (``compute_grpo_outcome_advantage``: (r - mean) / (std + 1e-6) over the answers of one
  question, unbiased std, a group of one gets mean 0 and std 1).

Every loss returns per-token values; the trainer multiplies by the response mask, sums, and
divides by the global token count (Megatron's ``calculate_per_token_loss``), which is verl's
``loss_agg_mode="token-mean"`` taken over the whole mini-batch instead of per micro-batch
(the same when micro-batches hold equal token counts, and independent of the micro-batch size).

Logits are sharded over tensor-parallel ranks along the vocabulary. Nothing here gathers the
vocabulary: the NLL is Megatron's ``vocab_parallel_cross_entropy``; the entropy all-reduces
three numbers per token over the TP group (max, sum of exp, sum of exp x logit).
"""

from __future__ import annotations

import torch

GRPO_CLIP_RATIO = 0.2
"""verl's ``actor.clip_ratio`` default (both ``clip_ratio_low`` and ``clip_ratio_high``)."""
GRPO_CLIP_RATIO_C = 3.0
"""verl's ``actor.clip_ratio_c``: the dual-clip bound on the loss of negative advantages."""
GRPO_ADVANTAGE_EPS = 1e-6
"""verl's ``epsilon`` in ``compute_grpo_outcome_advantage``."""
LOG_RATIO_CLAMP = 20.0
"""verl clamps log p - log p_old to +-20 before exp, so one wild token cannot overflow."""


def masked_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Rows added to pad the vocab for TP are not tokens: take them out of the softmax."""
    from megatron.core import parallel_state as ps

    width = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * width
    if start + width <= vocab_size:
        return logits
    keep = torch.arange(start, start + width, device=logits.device) < vocab_size
    return logits.masked_fill(~keep, float("-inf"))


def token_nll(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, tau_train: float) -> torch.Tensor:
    """Per-token NLL of vocab-parallel logits at temperature tau_t (no gather of the vocab)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # Megatron's vocab_parallel_cross_entropy works in place on its input, so it must get a
    # tensor of its own: the cast's copy (bf16 logits), divided in place (one fp32 copy less),
    # or a copy of fp32 logits, which other losses of the same logits still read.
    scaled = logits.float()
    if scaled is logits:
        scaled = logits / tau_train if tau_train != 1.0 else logits.clone()
    elif tau_train != 1.0:
        scaled.div_(tau_train)
    scaled = masked_vocab_padding(scaled, vocab_size)
    return vocab_parallel_cross_entropy(scaled, labels)


def vocab_parallel_entropy(logits: torch.Tensor, vocab_size: int, tau_train: float) -> torch.Tensor:
    """Per-token entropy of softmax(logits / tau) when each TP rank holds a slice of the vocab.

    H = log Z - sum_v e^{x_v} x_v / Z with x = logits - max (shift-invariant). The max is a
    detached MAX all-reduce; Z and the weighted sum are SUM all-reduces whose backward is the
    identity (``reduce_from_tensor_model_parallel_region``): every TP rank computes the same H
    from the reduced sums, so each rank's gradient w.r.t. its own slice is exact.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    scaled = masked_vocab_padding(logits.float() / tau_train, vocab_size)
    group = ps.get_tensor_model_parallel_group()
    row_max = scaled.detach().max(dim=-1, keepdim=True).values
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = scaled - row_max
    exp = shifted.exp()  # padding rows: exp(-inf) = 0
    # 0 x (-inf) is NaN: padding contributes nothing to the weighted sum.
    weighted = exp * shifted.masked_fill(torch.isinf(shifted), 0.0)
    sums = torch.stack([exp.sum(dim=-1), weighted.sum(dim=-1)])
    sums = reduce_from_tensor_model_parallel_region(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-normalised outcome advantages of consecutive groups of ``group_size`` answers
    (verl's ``compute_grpo_outcome_advantage`` with ``norm_adv_by_std_in_grpo=True``)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.double().view(-1, group_size)
    if group_size == 1:  # verl: a lone answer has mean 0 and std 1, its advantage its reward
        mean, std = torch.zeros_like(groups), torch.ones_like(groups)
    else:
        mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + GRPO_ADVANTAGE_EPS)).view(-1).to(rewards.dtype)


def low_var_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(current || reference) by the k3 estimator, verl's ``low_var_kl``
    (``kl_penalty`` in core_algos): ``exp(ref - logp) - (ref - logp) - 1``, non-negative and
    unbiased for samples drawn from the current policy, clamped to [-10, 10] as verl does."""
    log_ratio = ref_log_probs - log_probs
    return (log_ratio.exp() - log_ratio - 1).clamp(-10.0, 10.0)


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio: float = GRPO_CLIP_RATIO,
    clip_ratio_c: float = GRPO_CLIP_RATIO_C,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss (verl's vanilla ``compute_policy_loss``) and a 0/1 tensor marking
    the tokens where the clip was active (verl's ``pg_clipfrac`` numerator)."""
    log_ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    pessimistic = torch.maximum(unclipped, clipped)
    # Dual clip: a negative advantage's loss is bounded by -A x clip_ratio_c.
    dual = torch.minimum(pessimistic, -advantages * clip_ratio_c)
    loss = torch.where(advantages < 0, dual, pessimistic)
    return loss, (clipped > unclipped).float()


# --- loss functions the trainer's schedule calls, one per mode -------------------------------
class TokenLoss:
    """``loss(micro_batch, logits) -> (loss_sum, num_tokens, report)`` for Megatron's
    ``forward_step``; ``report`` maps each name in :attr:`report_keys` to (sum, count), which
    the trainer sums over micro-batches and data-parallel ranks. The first key is the loss."""

    report_keys: tuple[str, ...] = ("lm loss",)

    def __init__(self, vocab_size: int, tau_train: float):
        self.vocab_size, self.tau_train = vocab_size, tau_train

    def per_token(self, mb, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, mb, logits: torch.Tensor):
        values = self.per_token(mb, logits)
        mask = mb.loss_mask
        count = mask.sum()
        loss_sum = (values[self.report_keys[0]] * mask).sum()
        report = {
            key: torch.stack([(values[key] * mask).sum().detach().float(), count.detach().float()])
            for key in self.report_keys
        }
        return loss_sum, count.to(torch.int), report


class NLLLoss(TokenLoss):
    """SFT on the model's own answers (SePT and its ablations)."""

    def per_token(self, mb, logits):
        return {"lm loss": token_nll(logits, mb.labels, self.vocab_size, self.tau_train)}


class EntropyLoss(TokenLoss):
    """EM-FT: minimise the entropy of each answer position's next-token distribution."""

    report_keys = ("lm loss", "entropy")  # the loss is the entropy; logged under both names

    def per_token(self, mb, logits):
        entropy = vocab_parallel_entropy(logits, self.vocab_size, self.tau_train)
        return {"lm loss": entropy, "entropy": entropy}


class GRPOLoss(TokenLoss):
    """GRPO's clipped policy gradient. ``mb.old_log_probs`` None means one update per rollout,
    where the old policy is the current one: the ratio is exactly 1 (verl's on-policy case).
    ``kl_coef`` > 0 (``train.kl_coef``; off by default, as the reference's use_kl_loss=False)
    adds ``kl_coef`` x the per-token :func:`low_var_kl` to the initial model, whose log-probs
    come as ``mb.ref_log_probs`` (verl's use_kl_loss with kl_loss_type=low_var_kl)."""

    def __init__(self, vocab_size: int, tau_train: float, kl_coef: float = 0.0):
        super().__init__(vocab_size, tau_train)
        self.kl_coef = kl_coef
        self.report_keys = ("lm loss", "clip_fraction", "entropy") + (("kl",) if kl_coef else ())

    def per_token(self, mb, logits):
        log_probs = -token_nll(logits, mb.labels, self.vocab_size, self.tau_train)
        old = mb.old_log_probs if mb.old_log_probs is not None else log_probs.detach()
        loss, clipped = clipped_policy_loss(log_probs, old, mb.advantages)
        with torch.no_grad():
            entropy = vocab_parallel_entropy(logits.detach(), self.vocab_size, self.tau_train)
        values = {"lm loss": loss, "clip_fraction": clipped, "entropy": entropy}
        if self.kl_coef:
            if mb.ref_log_probs is None:
                raise RuntimeError("train.kl_coef > 0 needs the initial model's log-probs")
            kl = low_var_kl(log_probs, mb.ref_log_probs)
            values |= {"lm loss": loss + self.kl_coef * kl, "kl": kl.detach()}
        return values


class LogProbCollector(TokenLoss):
    """Forward-only: keeps each micro-batch's per-token log-probs (GRPO's old policy)."""

    def __call__(self, mb, logits):
        with torch.no_grad():
            log_probs = -token_nll(logits.detach(), mb.labels, self.vocab_size, self.tau_train)
        zero = torch.zeros((), device=logits.device)
        return zero, mb.loss_mask.sum().to(torch.int), {"log_probs": log_probs}


LOSSES = {"em": EntropyLoss, "grpo": GRPOLoss}


def loss_for_mode(mode: str, vocab_size: int, tau_train: float, kl_coef: float = 0.0) -> TokenLoss:
    """The training loss of ``train.mode``: NLL for the SFT modes, else that mode's own."""
    if mode == "grpo":
        return GRPOLoss(vocab_size, tau_train, kl_coef)
    return LOSSES.get(mode, NLLLoss)(vocab_size, tau_train)
