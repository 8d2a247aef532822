"""``sept-megatron plan`` for the paper's baselines: EM-FT and GRPO recipes fit their stated
hardware, GRPO's n-fold rollout grows the engines' KV cache, and both modes' extra loss
memory (and GRPO's extra forward) show up. Pure arithmetic: no process, no weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from published import write_config

from sept_megatron.cli import main as cli_main
from sept_megatron.config import load_config
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.plan import planner as plan

PAPER = Path(__file__).resolve().parents[2] / "examples" / "paper"
RECIPES = ("em-ft-qwen2.5-math-7b-dsr", "grpo-qwen2.5-math-7b-dsr")


@pytest.fixture(scope="module")
def qwen7b_dir(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("published"), "qwen2.5-math-7b")


def estimate(qwen7b_dir: Path, *overrides: str, pp: int = 1) -> plan.Estimate:
    cfg = load_config(
        str(PAPER / "grpo-qwen2.5-math-7b-dsr.yaml"),
        [f"parallel.pipeline_parallel={pp}", "parallel.tensor_parallel=2", *overrides],
    )
    arch = arch_from_hf_config(load_hf_config(str(qwen7b_dir)))
    kernels = plan.resolve_kernels(cfg, arch, on_gpu=True, te_available=True)
    return plan.estimate(cfg, arch, plan.Hardware(1, 8, 80.0), kernels)


@pytest.mark.parametrize("recipe", RECIPES)
def test_paper_baseline_recipes_fit_one_node(capsys, qwen7b_dir, recipe):
    path = PAPER / f"{recipe}.yaml"
    rc = cli_main(
        [
            "plan",
            "--config",
            str(path),
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--gpu-mem-gb",
            "80",
            "--hf-config",
            str(qwen7b_dir),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and ": fits" in out, out
    assert "--nodes 1 --gpus-per-node 8 --gpu-mem-gb 80" in path.read_text()


def _labels(stage: plan.StageMemory) -> list[str]:
    return [line.label for line in stage.training]


def test_grpo_counts_the_n_fold_rollout_and_its_extra_forward(qwen7b_dir):
    grpo = estimate(qwen7b_dir)
    one = estimate(qwen7b_dir, "rollout.n=1", "train.mode=online", "train.mini_batch_size=64")
    kv_grpo, kv_one = (
        next(l.gib for l in e.stages[0].rollout if l.label.startswith("  (KV cache")) for e in (grpo, one)
    )
    assert kv_grpo == pytest.approx(8 * kv_one)  # 8 answers per question
    assert any("old log-probs" in label for label in _labels(grpo.stages[0]))
    assert not any(label.startswith("grpo") for label in _labels(one.stages[0]))
    assert any("1024 sequences" in n and "one extra forward pass" in n for n in grpo.notes)
    single = estimate(qwen7b_dir, "train.mini_batch_size=1024")
    assert any("no extra forward" in n for n in single.notes)


def test_mode_lines_sit_on_the_last_stage_only(qwen7b_dir):
    first, last = estimate(qwen7b_dir, "train.mode=em", pp=2).stages
    assert not any(label.startswith("em:") for label in _labels(first))
    entropy = next(l.gib for l in last.training if l.label.startswith("em: entropy"))
    assert entropy > 0
    assert last.training_gib - entropy == pytest.approx(
        estimate(qwen7b_dir, "train.mode=coupled", pp=2).stages[1].training_gib
    )
