"""The training losses of sept_megatron.trainer.losses against hand computations on tiny batches:
NLL, entropy (and its vocab-parallel form at TP = 2), GRPO advantages, ratio, clipping,
masking and token-mean aggregation; GRPO's reward from the grader on the shared benchmarks."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from mp import free_port, run_torchrun

from sept_megatron.trainer.losses import (
    EntropyLoss,
    GRPOLoss,
    NLLLoss,
    clipped_policy_loss,
    grpo_advantages,
    low_var_kl,
    vocab_parallel_entropy,
)

# Every tensor names its device: the suite runs the CPU layer in strict mode, where a device-less
# tensor in a collective (the entropy's all-reduce) is refused, as it would be on CUDA.
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """Megatron's TP group of one, in this process (the losses read the TP rank and group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _entropy_by_hand(row: list[float]) -> float:
    z = sum(math.exp(x) for x in row)
    return -sum(math.exp(x) / z * math.log(math.exp(x) / z) for x in row)


def test_entropy_matches_a_hand_computation_with_temperature_and_vocab_padding():
    logits = torch.tensor([[[1.0, 2.0, 3.0, 50.0], [0.0, 0.0, 0.0, 50.0]]], device=CPU)
    # The last column is vocab padding: out of the softmax despite its huge logit.
    entropy = vocab_parallel_entropy(logits, vocab_size=3, tau_train=0.5)
    assert entropy[0, 0].item() == pytest.approx(_entropy_by_hand([2.0, 4.0, 6.0]), rel=1e-6)
    assert entropy[0, 1].item() == pytest.approx(math.log(3), rel=1e-6)


def test_entropy_gradient_matches_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, device=CPU, requires_grad=True)
    vocab_parallel_entropy(logits, 5, 1.0).sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    probs = torch.softmax(reference, -1)
    (-(probs * torch.log_softmax(reference, -1)).sum()).backward()
    assert torch.allclose(logits.grad, reference.grad, atol=1e-10)


def test_vocab_parallel_entropy_at_tp2_equals_the_unsharded_one(tmp_path):
    out = tmp_path / "entropy.json"
    run_torchrun(2, "tests/trainer/losses/_entropy_worker.py", str(out), timeout=180)
    result = json.loads(out.read_text())
    assert torch.allclose(
        torch.tensor(result["entropy"], device=CPU), torch.tensor(result["reference"], device=CPU), atol=1e-10
    )
    assert torch.allclose(
        torch.tensor(result["grad"], device=CPU), torch.tensor(result["ref_grad"], device=CPU), atol=1e-10
    )
    assert result["pad_grad"] == 0.0


def test_grpo_advantages_are_group_normalised_with_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], device=CPU)
    adv = grpo_advantages(rewards, group_size=4)
    # Group 1: mean 0.25, unbiased std sqrt(0.25) = 0.5 -> (1 - .25) / .5 = 1.5, -0.5 x 3.
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)
    # Group 2: all equal -> zero advantage (no signal from that question).
    assert adv[4:].tolist() == [0.0] * 4
    # A group of one (verl): mean 0, std 1, the advantage is the reward.
    assert grpo_advantages(torch.tensor([1.0, 0.0], device=CPU), 1).tolist() == pytest.approx(
        [1.0, 0.0], abs=1e-5
    )
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(rewards, 3)


def test_clipped_policy_loss_ratio_clip_and_dual_clip_by_hand():
    old = torch.zeros(6, device=CPU)
    log_probs = torch.log(torch.tensor([1.1, 1.5, 0.5, 1.5, 0.5, 5.0], device=CPU))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], device=CPU)
    loss, clipped = clipped_policy_loss(log_probs, old, adv)
    # A > 0: -A x min(r, clip(r)) ; A < 0: -A x max(r, clip(r)), at most -A x 3 (dual clip).
    expected = [-1.1, -1.2, -0.5, 1.5, 0.8, 3.0]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert clipped.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    # Ratio 1 (one update per rollout): the loss is -A, its gradient -A per token.
    lp = torch.zeros(3, device=CPU, requires_grad=True)
    loss, _ = clipped_policy_loss(lp, lp.detach(), torch.tensor([2.0, -1.0, 0.5], device=CPU))
    loss.sum().backward()
    assert lp.grad.tolist() == pytest.approx([-2.0, 1.0, -0.5])


def _micro_batch(labels, mask, advantages=None, old=None, ref=None):
    return SimpleNamespace(
        labels=torch.tensor(labels, device=CPU),
        loss_mask=torch.tensor(mask, device=CPU),
        advantages=advantages,
        old_log_probs=old,
        ref_log_probs=ref,
    )


def test_losses_mask_the_prompt_and_sum_for_a_token_mean():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]], device=CPU))
    mb = _micro_batch([[0, 1, 2]], [[0.0, 1.0, 1.0]])
    loss_sum, count, report = NLLLoss(3, 1.0)(mb, logits)
    assert int(count) == 2  # the prompt position is masked
    assert loss_sum.item() == pytest.approx(-math.log(0.8) - math.log(0.6), rel=1e-6)
    assert report["lm loss"].tolist() == pytest.approx([loss_sum.item(), 2.0])
    loss_sum, _, report = EntropyLoss(3, 1.0)(mb, logits)
    by_hand = sum(-sum(p * math.log(p) for p in row) for row in ([0.1, 0.8, 0.1], [0.2, 0.2, 0.6]))
    assert loss_sum.item() == pytest.approx(by_hand, rel=1e-6)
    assert report["entropy"].tolist() == pytest.approx([by_hand, 2.0], rel=1e-6)


def test_grpo_loss_uses_old_log_probs_and_reports_clip_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]], device=CPU))
    labels, mask = [[0, 1, 2]], [[0.0, 1.0, 1.0]]
    # Old probabilities 0.4 and 0.6: ratios 2 (clipped to 1.2) and 1; advantage +1.
    old = torch.log(torch.tensor([[0.9, 0.4, 0.6]], device=CPU))
    mb = _micro_batch(labels, mask, torch.tensor([[1.0]], device=CPU), old)
    loss_sum, count, report = GRPOLoss(3, 1.0)(mb, logits)
    assert loss_sum.item() == pytest.approx(-1.2 - 1.0, rel=1e-6)
    assert report["clip_fraction"].tolist() == pytest.approx([1.0, 2.0])
    assert report["entropy"][0].item() > 0
    # No old log-probs: ratio 1, the loss is -A per response token.
    mb = _micro_batch(labels, mask, torch.tensor([[0.5]], device=CPU))
    loss_sum, _, report = GRPOLoss(3, 1.0)(mb, logits)
    assert loss_sum.item() == pytest.approx(-1.0)
    assert report["clip_fraction"][0].item() == 0.0


def test_low_var_kl_is_verls_k3_estimator_by_hand():
    log_probs = torch.log(torch.tensor([0.5, 0.2, 0.9], device=CPU))
    ref = torch.log(torch.tensor([0.25, 0.2, 0.3], device=CPU))
    by_hand = [(r / p) - math.log(r / p) - 1 for p, r in ((0.5, 0.25), (0.2, 0.2), (0.9, 0.3))]
    assert low_var_kl(log_probs, ref).tolist() == pytest.approx(by_hand, rel=1e-6)
    assert low_var_kl(log_probs, log_probs).abs().max().item() == 0.0  # no drift, no penalty
    assert (low_var_kl(log_probs, ref) >= 0).all()


def test_grpo_kl_penalty_adds_coef_times_kl_to_the_initial_model():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]], device=CPU))
    labels, mask = [[0, 1, 2]], [[0.0, 1.0, 1.0]]
    ref = torch.log(torch.tensor([[0.5, 0.4, 0.3]], device=CPU))  # the initial model's p of the labels
    mb = _micro_batch(labels, mask, torch.tensor([[1.0]], device=CPU), ref=ref)
    plain, _, plain_report = GRPOLoss(3, 1.0)(mb, logits)
    assert "kl" not in plain_report  # off by default: no reference needed, nothing logged
    with_kl, _, report = GRPOLoss(3, 1.0, kl_coef=0.1)(mb, logits)
    kl_by_hand = sum(r / p - math.log(r / p) - 1 for p, r in ((0.8, 0.4), (0.6, 0.3)))
    assert report["kl"].tolist() == pytest.approx([kl_by_hand, 2.0], rel=1e-6)
    assert with_kl.item() == pytest.approx(plain.item() + 0.1 * kl_by_hand, rel=1e-6)
    with pytest.raises(RuntimeError, match="initial model's log-probs"):
        GRPOLoss(3, 1.0, kl_coef=0.1)(_micro_batch(labels, mask, torch.tensor([[1.0]], device=CPU)), logits)


# --- GRPO's reward: the project's grader on the shared benchmarks ---------------------------
def test_grpo_rewards_on_known_right_and_wrong_answers(benchmark_dir):
    from sept_megatron.data import load_questions
    from sept_megatron.loop.modes import grade_round, reward_stats

    questions = load_questions(benchmark_dir / "math500.parquet")[:3]
    truths = [q.ground_truth for q in questions]
    responses = []
    for truth in truths:  # n = 2: one right answer, one wrong
        responses += [f"So the answer is $\\boxed{{{truth}}}$.", "The answer is \\boxed{-123456789}."]
    rewards = grade_round(questions, responses, n=2)
    assert rewards == [1.0, 0.0] * 3
    assert reward_stats(rewards, 2) == {"rollout/reward_mean": 0.5, "rollout/groups_all_equal": 0.0}
    assert reward_stats([1.0, 1.0, 0.0, 1.0], 2)["rollout/groups_all_equal"] == 0.5


def test_grpo_refuses_a_bank_without_ground_truth():
    from sept_megatron.config import ConfigError
    from sept_megatron.loop.modes import check_train_questions

    bank = [SimpleNamespace(ground_truth="3"), SimpleNamespace(ground_truth=None)]
    with pytest.raises(ConfigError, match=r"train.mode=grpo.*1 of 2 questions have none \(first: row 2\)"):
        check_train_questions("grpo", bank, "x.jsonl")
    check_train_questions("online", bank, "x.jsonl")  # SePT needs no ground truth
