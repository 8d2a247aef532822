"""The paper's baselines learn on the demo task, not just run: from the demo's base model
(built once and cached, as ``sept-megatron demo`` does), GRPO raises the mean reward of its
own answers over a few rounds, and EM-FT lowers their entropy, on a fixed seed, through the
real ``train`` CLI."""

import json
from pathlib import Path

import pytest
from mp import run_python

pytestmark = pytest.mark.slow

ROUNDS = 16


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory) -> tuple[str, Path]:
    """The demo's base model (default recipe, from the demo's cache) and its train split."""
    from sept_megatron.demo.base_model import BaseModelRecipe, recipe_key
    from sept_megatron.demo.run import DemoRecipe, default_cache, prepare_data

    out = tmp_path_factory.mktemp("demo_inputs")
    script = out / "build_base.py"
    script.write_text(
        "import sys\nfrom sept_megatron.demo.base_model import build_base_model\n"
        "build_base_model(sys.argv[1], progress=False)\n"
    )
    run_python(str(script), default_cache(), timeout=3600)  # a no-op when cached
    base_dir = str(Path(default_cache()) / f"base-{recipe_key(BaseModelRecipe())}")
    data_dir = prepare_data(out, BaseModelRecipe(), DemoRecipe())
    return base_dir, data_dir / "train.jsonl"


def run_mode(demo_inputs, run_dir: Path, mode: str, *extra: str) -> list[dict]:
    base_dir, train_file = demo_inputs
    args = [
        f"model.hf_path={base_dir}",
        f"data.train_files={train_file}",
        f"train.mode={mode}",
        f"train.rounds={ROUNDS}",
        "train.mini_batch_size=64",
        "train.micro_batch_size=64",
        "train.warmup_steps=0",
        "data.max_prompt_length=128",
        "data.max_response_length=64",
        "model.params_dtype=float32",
        "rollout.device=cpu",
        "rollout.batch_size=128",
        "data.shuffle_seed=0",
        "train.seed=0",
        f"logging.run_dir={run_dir}",
        "logging.progress=false",
        "checkpoint.export_hf=false",
        *extra,
    ]
    run_python("sept_megatron.cli", "train", *args, timeout=1800)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_mean_reward(demo_inputs, tmp_path):
    # The demo's GRPO: 16 questions x 8 answers, 2 updates per round, lr 2 x SePT's 1e-4;
    # the control is the same run with the weights frozen in effect (lr 1e-12): the same
    # questions and sampling seeds each round, so the difference is what GRPO learned.
    grpo_args = ("train.prompts_per_round=16", "rollout.n=8")
    learned = run_mode(demo_inputs, tmp_path / "grpo", "grpo", *grpo_args, "train.lr=2e-4")
    frozen = run_mode(demo_inputs, tmp_path / "frozen", "grpo", *grpo_args, "train.lr=1e-12")
    rewards = {
        name: [m["rollout/reward_mean"] for m in runs]
        for name, runs in (("grpo", learned), ("frozen", frozen))
    }
    print("mean reward per round:", json.dumps({k: [round(r, 3) for r in v] for k, v in rewards.items()}))
    assert rewards["grpo"][0] == rewards["frozen"][0]  # round 1: the same base, same samples
    later = {name: sum(v[ROUNDS // 2 :]) / (ROUNDS - ROUNDS // 2) for name, v in rewards.items()}
    assert later["grpo"] > later["frozen"] + 0.03, rewards
    assert all(m["train/optimizer_steps"] == 2 for m in learned)


def test_em_ft_lowers_the_entropy_of_the_answers(demo_inputs, tmp_path):
    # The demo's schedule: 128 questions, 2 steps per round, lr 1e-4 (SePT's, as the reference).
    metrics = run_mode(demo_inputs, tmp_path, "em", "train.prompts_per_round=128", "train.lr=1e-4")
    entropy = [m["train/entropy"] for m in metrics]
    print("EM-FT answer entropy per round:", json.dumps([round(e, 4) for e in entropy]))
    assert entropy[-1] < 0.8 * entropy[0], entropy
