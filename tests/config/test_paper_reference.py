"""The recipes and defaults against the reference (the authors' verl recipe, issue 20): one test
per difference the issue lists, each failing with the project's earlier value."""

import math
import re
from pathlib import Path

import pytest
import torch

from sept_megatron.config import Config, ConfigError, TrainConfig, load_config, validate
from sept_megatron.eval.cli import parse_args
from sept_megatron.loop.schedule import offline_settings, offline_temperature
from sept_megatron.trainer.sft import _build_scheduler, scheduler_steps

ROOT = Path(__file__).resolve().parents[2]
SEPT_RECIPES = sorted(ROOT.glob("examples/*.yaml")) + [
    p
    for p in sorted(ROOT.glob("examples/paper/*.yaml"))
    if not any(other in p.name for other in ("offline", "em-ft", "grpo"))
]  # the other methods' own
BENCHMARKS = {"math500", "amc23", "aime", "aime25", "olympiadbench", "minerva"}


def recipe(path) -> Config:
    return load_config(str(ROOT / path))


@pytest.mark.parametrize("path", SEPT_RECIPES, ids=lambda p: p.name)
def test_warmup_is_ten_rounds_of_the_scheduler(path):
    train = load_config(str(path)).train
    assert (train.warmup_steps, train.lr_schedule_interval) == (10, "round")


def lr_sequence(cfg: TrainConfig, scheduler_total: int, calls: int) -> list[float]:
    """The LR at each of ``calls`` scheduler steps of a real Megatron scheduler."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = _build_scheduler(optimizer, cfg, scheduler_total)
    values = []
    for _ in range(calls):
        values.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    return values


def test_round_interval_counts_warmup_in_rounds():
    cfg = TrainConfig(lr=1e-7, warmup_steps=10, lr_schedule_interval="round")
    assert scheduler_steps(cfg, total_steps=200, total_rounds=100) == 100
    per_round = lr_sequence(cfg, 100, 12)
    assert per_round[:11] == pytest.approx([1e-7 * r / 10 for r in range(11)], abs=1e-20)
    # Two optimizer steps per round: full LR from optimizer step 21 on, i.e. 20 warmup steps.
    assert scheduler_steps(TrainConfig(), total_steps=200, total_rounds=100) == 200


def test_offline_recipe_uses_the_reference_sft_settings():
    cfg = recipe("examples/paper/qwen2.5-math-7b-dsr-offline.yaml")
    assert cfg.train.mode == "offline" and offline_temperature(cfg) == 0.6
    train = offline_settings(cfg).train
    assert (train.lr, train.adam_beta1, train.adam_beta2) == (1e-5, 0.9, 0.95)
    assert (train.lr_decay_style, train.warmup_ratio, train.epochs) == ("cosine", 0.01, 3.0)
    assert (train.prompts_per_round, train.mini_batch_size) == (128, 128)  # a step per 128
    validate(offline_settings(cfg), world_size=8)


def test_offline_default_keeps_the_train_section():
    cfg = load_config(None, ["train.mode=offline", "rollout.tau_start=0.5"])
    assert offline_settings(cfg) is cfg and offline_temperature(cfg) == 0.5


def test_offline_cosine_warms_up_one_percent_then_decays_to_zero():
    cfg = offline_settings(load_config(None, ["train.mode=offline", "offline.hyperparameters=sft"]))
    values = lr_sequence(cfg.train, 300, 301)
    assert values[3] == pytest.approx(1e-5) and values[2] < 1e-5  # floor(0.01 x 300) = 3
    assert values[150] == pytest.approx(1e-5 * (1 + math.cos(math.pi * 147 / 297)) / 2)
    assert values[300] == pytest.approx(0.0, abs=1e-12)


def test_offline_fields_are_validated():
    cfg = load_config(
        None,
        [
            "model.hf_path=x",
            "data.train_files=[a]",
            "train.mode=offline",
            "offline.hyperparameters=sft",
            "offline.sequences_per_step=127",
            "rollout.n=2",
            "offline.warmup_ratio=1.5",
        ],
    )
    with pytest.raises(ConfigError, match="offline.sequences_per_step=127") as error:
        validate(cfg, world_size=1)
    assert "offline.warmup_ratio=1.5" in str(error.value)


def test_default_sweep_is_the_reference_grid():
    args = parse_args(
        ["--model", str(ROOT), "--benchmarks", str(ROOT / "README.md"), "--out", "/tmp/unused-sweep"]
    )
    assert args.temperatures == pytest.approx([i / 10 for i in range(17)])


@pytest.mark.parametrize(
    "path",
    [
        "examples/deepseek-math-7b.yaml",
        "examples/paper/deepseek-math-7b-instruct-dsr.yaml",
        "examples/paper/deepseek-math-7b-instruct-otm.yaml",
    ],
)
def test_deepseek_recipes_use_the_instruct_model(path):
    cfg = recipe(path)
    assert Path(cfg.model.hf_path).name == "deepseek-math-7b-instruct"
    assert cfg.data.chat_template == "deepseek-math"


@pytest.mark.parametrize("path", ["examples/qwen2.5-32b.yaml", "examples/llama3-70b.yaml"])
def test_general_purpose_recipes_start_tau_s_at_0_9(path):
    assert recipe(path).rollout.tau_start == 0.9


def test_qwen_32b_uses_the_qwen_base_template():
    assert recipe("examples/qwen2.5-32b.yaml").data.chat_template == "qwen-base"


@pytest.mark.parametrize("path", SEPT_RECIPES, ids=lambda p: p.name)
def test_recipes_aggregate_the_loss_as_verl(path):
    train = load_config(str(path)).train
    # verl's token-mean per micro-batch of ppo_micro_batch_size_per_gpu=4, with checkpointing.
    assert (train.loss_aggregation, train.micro_batch_size, train.recompute) == ("microbatch_mean", 4, "full")


def test_train_docstring_no_longer_claims_verl_equality():
    import sept_megatron.trainer.sft

    assert "exactly as verl" not in sept_megatron.trainer.sft.__doc__


@pytest.mark.parametrize("path", SEPT_RECIPES, ids=lambda p: p.name)
def test_validation_cadence_is_the_papers(path):
    ev = load_config(str(path)).eval
    assert {Path(b).stem for b in ev.benchmarks} == BENCHMARKS
    assert (ev.every_n_rounds, ev.n, ev.temperature, ev.max_questions, ev.before_training) == (
        50,
        32,
        1.0,
        None,
        True,
    )


def test_readme_cluster_command_uses_the_papers_lr():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it on a cluster", 1)[1].split("\n## ", 1)[0]
    assert all(float(v) == 1e-7 for v in re.findall(r"train\.lr=([0-9.e-]+)", section))
    assert all(recipe(p).train.lr == 1e-7 for p in SEPT_RECIPES)
