"""SFTTrainer in train.mode em and grpo: EM-FT lowers the entropy of the answers it trains on;
GRPO's first step (old policy = current) is -token-mean advantage, its second step clips; both
agree across TP = 2, PP = 2 and DP = 2 with one process (vocab-parallel entropy, log-probs
collected on the last stage and matched to the same micro-batches)."""

import json

import pytest
from mp import run_python, run_torchrun
from test_sft_trainer import train_inputs  # noqa: F401  (the fixture: tiny HF model + samples)

pytestmark = pytest.mark.slow

WORKER = "tests/trainer/sft/_modes_worker.py"
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]  # as in _modes_worker.py
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def single(train_inputs):  # noqa: F811
    out = train_inputs / "modes_single.json"
    run_python(WORKER, train_inputs / "hf", train_inputs / "samples.json", out)
    return json.loads(out.read_text())["single"]


@pytest.fixture(scope="module")
def parallel(train_inputs):  # noqa: F811
    out = train_inputs / "modes_parallel.json"
    run_torchrun(2, WORKER, train_inputs / "hf", train_inputs / "samples.json", out)
    return json.loads(out.read_text())


def test_em_ft_lowers_the_entropy_of_its_answers(single):
    entropy = single["em"]["entropy"]
    assert single["em"]["loss"] == pytest.approx(entropy)  # the loss is the entropy
    assert entropy[0] > entropy[1] > entropy[2] > single["em"]["eval_after"]


def test_grpo_first_step_is_minus_the_token_mean_advantage(single, train_inputs):  # noqa: F811
    samples = json.loads((train_inputs / "samples.json").read_text())["samples"]
    tokens = [len(s["response_ids"]) for s in samples]
    expected = -sum(a * n for a, n in zip(ADVANTAGES, tokens)) / sum(tokens)
    grpo = single["grpo"]
    assert grpo["loss"][0] == pytest.approx(expected, abs=1e-6)
    assert grpo["clip_fraction"][0] == 0.0  # ratio exactly 1 before any update
    # After one update at a large lr the second mini-batch's ratios leave [0.8, 1.2].
    assert grpo["clip_fraction"][1] > 0
    assert grpo["response_tokens"] == [sum(tokens)] * 2


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_layouts_match_one_process(single, parallel, layout):
    for mode in ("em", "grpo"):
        for key, values in single[mode].items():
            assert parallel[layout][mode][key] == pytest.approx(values, abs=TOLERANCE), (mode, key)
