"""``sept-megatron config``: the resolved tree only after train's start-up checks pass; else
every problem at once and exit 2 (sept_megatron/loop/startup.py: check_run)."""

from __future__ import annotations

from pathlib import Path

import yaml

from sept_megatron.cli import main
from sept_megatron.config import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "examples" / "qwen2.5-math-7b.yaml")


def _tiny_overrides(root: Path) -> list[str]:
    return [
        f"model.hf_path={root / 'hf'}",
        f"data.train_files=[{root / 'train.jsonl'}]",
        "eval.benchmarks=[]",
        "parallel.sequence_parallel=false",
        "rollout.backend=hf",
    ]


def test_every_problem_is_listed_at_once(capsys):
    status = main(
        [
            "config",
            "--config",
            RECIPE,
            "rollout.anneal=bogus",
            "train.lr=-1",
            "parallel.tensor_parallel=3",
            "rollout.placement=nowhere",
        ]
    )
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    for problem in (
        "rollout.anneal='bogus'",
        "rollout.placement='nowhere'",
        "train.lr",
        "model.hf_path='/models/Qwen2.5-Math-7B'",
        "data.train_files: '/data/math_train.parquet' does not exist",
        "at world size 3",
    ):
        assert problem in captured.err, problem


def test_the_layout_is_checked_at_the_given_world_size(capsys):
    assert main(["config", "--config", RECIPE, "--world-size", "6"]) == 2
    assert "train.mini_batch_size=64 is not divisible by data-parallel size 3" in capsys.readouterr().err


def test_a_valid_config_prints_the_resolved_tree(tiny_run_inputs, capsys):
    overrides = _tiny_overrides(tiny_run_inputs) + ["train.lr=2e-7"]
    assert main(["config", "--config", RECIPE, "--world-size", "4", *overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# validated at world size 4\n")
    assert yaml.safe_load(out) == load_config(RECIPE, overrides).to_dict()


def test_the_model_shapes_are_checked(tiny_run_inputs, capsys):
    # The tiny model has 4 heads and 2 KV heads: TP=4 cannot split the KV heads.
    overrides = _tiny_overrides(tiny_run_inputs) + ["parallel.tensor_parallel=4"]
    assert main(["config", "--config", RECIPE, *overrides]) == 2
    assert "does not divide the model's 2 key/value heads" in capsys.readouterr().err


def test_hf_config_stands_in_for_the_weights(tiny_run_inputs, capsys):
    overrides = _tiny_overrides(tiny_run_inputs)[1:] + ["parallel.tensor_parallel=4"]
    hf_config = str(tiny_run_inputs / "hf" / "config.json")
    assert main(["config", "--config", RECIPE, "--hf-config", hf_config, *overrides]) == 2
    err = capsys.readouterr().err
    assert "2 key/value heads" in err and "/models/Qwen2.5-Math-7B" not in err
