"""SFTTrainer against a hand computation with transformers, and across layouts.

Two launches of ``_worker.py``: one process (the loss at tau_t = 1 and 2, a reference run, a
large-lr run, a warmup run) and two processes (the evaluation loss and the reference run at
TP=2, PP=2 and DP=2). The model is a tied Qwen2 whose vocab (the demo tokenizer's, 379) is
padded by Megatron (to 384 at TP=1, 512 at TP=2); the worker sets the padding rows of the output
layer to 1.0.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import make_tiny_model, make_tokenizer
from mp import run_python, run_torchrun
from transformers import AutoModelForCausalLM

from sept_megatron.trainer.model import padded_vocab_size

pytestmark = pytest.mark.slow

WORKER = "tests/trainer/sft/_worker.py"
PAD_ROW_VALUE = 1.0  # as in _worker.py
LOSS_TOLERANCE = 1e-5
LAYOUTS = ["tp2", "pp2", "dp2"]


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    """HF checkpoint dir and 4 fixed (prompt, response) samples ending with EOS."""
    root = tmp_path_factory.mktemp("train_inputs")
    tokenizer = make_tokenizer(root / "tokenizer")
    # initializer_range 0.1: logits of order 1, so tau_t and the padding rows visibly matter.
    model = make_tiny_model("qwen2", tokenizer, tie_word_embeddings=True, initializer_range=0.1)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(4):
        prompt = torch.randint(4, len(tokenizer), (3 + i,), generator=generator).tolist()
        response = torch.randint(4, len(tokenizer), (4 + i % 3,), generator=generator).tolist()
        samples.append({"prompt_ids": prompt, "response_ids": response + [tokenizer.eos_token_id]})
    (root / "samples.json").write_text(json.dumps({"samples": samples, "pad_id": tokenizer.pad_token_id}))
    return root


@pytest.fixture(scope="module")
def single(train_inputs):
    out = train_inputs / "single.json"
    run_python(WORKER, train_inputs / "hf", train_inputs / "samples.json", out)
    return json.loads(out.read_text())["single"]


@pytest.fixture(scope="module")
def parallel(train_inputs):
    out = train_inputs / "parallel.json"
    run_torchrun(2, WORKER, train_inputs / "hf", train_inputs / "samples.json", out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hf_model(train_inputs):
    return AutoModelForCausalLM.from_pretrained(train_inputs / "hf", local_files_only=True).eval()


def samples_of(train_inputs) -> list[dict]:
    return json.loads((train_inputs / "samples.json").read_text())["samples"]


def hand_loss(hf, samples: list[dict], tau: float, extra_logit=None) -> float:
    """Token-mean NLL over all response tokens (EOS included, prompt masked) of softmax(z / tau).

    ``extra_logit(hidden) -> [positions, n]`` appends logits for rows outside the vocab (to show
    what an unmasked padded vocab would do)."""
    total, count = 0.0, 0
    for sample in samples:
        ids = torch.tensor([sample["prompt_ids"] + sample["response_ids"]])
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True)
        logits = out.logits[0].double()
        if extra_logit is not None:
            logits = torch.cat([logits, extra_logit(out.hidden_states[-1][0]).double()], dim=-1)
        log_probs = F.log_softmax(logits / tau, dim=-1)
        start = len(sample["prompt_ids"])
        for position in range(start, ids.shape[1]):  # logits at t - 1 predict token t
            total -= float(log_probs[position - 1, ids[0, position]])
            count += 1
    return total / count


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_loss_is_the_token_mean_nll_of_response_tokens(train_inputs, hf_model, single, tau):
    expected = hand_loss(hf_model, samples_of(train_inputs), tau)
    assert single[f"eval_tau{tau:.0f}"] == pytest.approx(expected, abs=LOSS_TOLERANCE)


def test_the_checks_tell_tau_and_vocab_padding_apart(train_inputs, hf_model):
    """The hand loss moves by far more than the tolerance when tau_t is ignored or when the
    padding rows (set to 1.0 by the worker) enter the softmax."""
    samples = samples_of(train_inputs)
    vocab = hf_model.config.vocab_size
    padding_rows = padded_vocab_size(vocab, 128, 1) - vocab
    assert padding_rows > 0, "the test needs a vocab that Megatron pads"
    base = hand_loss(hf_model, samples, 1.0)
    assert abs(hand_loss(hf_model, samples, 2.0) - base) > 100 * LOSS_TOLERANCE
    with_padding = hand_loss(
        hf_model,
        samples,
        1.0,
        extra_logit=lambda hidden: (PAD_ROW_VALUE * hidden.sum(-1, keepdim=True)).expand(-1, padding_rows),
    )
    assert abs(with_padding - base) > 100 * LOSS_TOLERANCE


def test_the_trained_tokens_are_the_response_tokens(train_inputs, single):
    response_tokens = sum(len(s["response_ids"]) for s in samples_of(train_inputs))
    assert single["reference"]["tokens"] == [response_tokens] * 3
    # The first step's loss is the loss of the starting weights on the same mini-batch.
    assert single["reference"]["loss"][0] == pytest.approx(single["eval_tau1"], abs=1e-9)


def test_loss_falls_with_a_large_learning_rate(single):
    run = single["large_lr"]
    assert run["skipped"] == [0.0] * len(run["loss"])
    assert all(b < a for a, b in zip(run["loss"], run["loss"][1:])), run["loss"]
    assert run["eval_after"] < 0.8 * run["loss"][0]
    assert all(g > 0 for g in run["grad_norm"])


def test_learning_rate_warms_up_linearly_then_stays_constant(single):
    lr, warmup = 1e-3, 3  # as WARMUP in _worker.py
    expected = [lr * k / warmup for k in (1, 2, 3)] + [lr, lr]
    assert single["warmup"]["lr"] == pytest.approx(expected, rel=1e-9)
    assert single["reference"]["lr"] == pytest.approx([lr] * 3, rel=1e-9)  # no warmup


def test_the_lr_scheduler_can_step_once_per_round(single):
    """train.lr_schedule_interval=round (the reference's, issue 20): warmup counted in rounds
    of 2 optimizer steps, the LR constant within a round (as WARMUP/ROUNDS in _worker.py)."""
    lr = 1e-3
    assert single["rounds"]["lr_used"] == pytest.approx([0, 0, lr / 2, lr / 2, lr, lr], rel=1e-9)


def hand_grad_norm(hf, samples: list[dict], per_sample_mean: bool) -> float:
    """Gradient norm of the token-mean NLL over all response tokens, or (per_sample_mean) of
    the mean over samples of each sample's token mean (micro-batches of one sample)."""
    hf.zero_grad()
    losses, counts = [], []
    for sample in samples:
        ids = torch.tensor([sample["prompt_ids"] + sample["response_ids"]])
        log_probs = F.log_softmax(hf(ids).logits[0].double(), dim=-1)
        start = len(sample["prompt_ids"])
        targets = ids[0, start:]
        losses.append(-log_probs[start - 1 : ids.shape[1] - 1].gather(1, targets[:, None]).sum())
        counts.append(len(targets))
    if per_sample_mean:
        loss = sum(l / c for l, c in zip(losses, counts)) / len(samples)
    else:
        loss = sum(losses) / sum(counts)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters() if p.grad is not None))
    hf.zero_grad()
    return float(norm)


def test_loss_aggregation_weighs_tokens_as_configured(train_inputs, hf_model, single):
    """minibatch_token_mean (default) and microbatch_mean (verl's token-mean) give the
    gradients of their hand losses; the samples' token counts differ, so the two differ."""
    samples = samples_of(train_inputs)
    token_mean = hand_grad_norm(hf_model, samples, per_sample_mean=False)
    per_sample = hand_grad_norm(hf_model, samples, per_sample_mean=True)
    assert abs(token_mean - per_sample) > 1e-2 * token_mean
    assert single["reference"]["grad_norm"][0] == pytest.approx(token_mean, rel=1e-4)
    assert single["microbatch_mean"]["grad_norm"][0] == pytest.approx(per_sample, rel=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_match_one_process(layout, single, parallel):
    run, reference = parallel[layout], single
    assert run["eval_tau1"] == pytest.approx(reference["eval_tau1"], abs=LOSS_TOLERANCE)
    for key in ("loss", "grad_norm"):
        assert run["reference"][key] == pytest.approx(reference["reference"][key], abs=LOSS_TOLERANCE), key
    assert run["reference"]["tokens"] == reference["reference"]["tokens"]
    assert run["reference"]["eval_after"] == pytest.approx(
        reference["reference"]["eval_after"], abs=LOSS_TOLERANCE
    )
