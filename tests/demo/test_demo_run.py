"""`sept-megatron demo` end to end at toy scale: every phase runs and the report is complete."""

import json

import pytest

from mp import run_python

pytestmark = pytest.mark.slow

SCRIPT = '''
import sys
from sept_megatron.demo.base_model import BaseModelRecipe
from sept_megatron.demo.run import DemoRecipe, run_demo

if __name__ == "__main__":
    out, cache = sys.argv[1], sys.argv[2]
    base = BaseModelRecipe(hidden_size=32, num_layers=2, ffn_hidden_size=64, n_train=400,
                           steps=20, batch_size=16)
    demo = DemoRecipe(rounds=2, prompts_per_round=16, mini_batch_size=8, temperatures=(0.0, 1.0),
                      eval_samples=8, test_questions=16, val_questions=16, max_response_length=48)
    run_demo(out, 0, True, demo, base, cache_dir=cache, wandb_mode="disabled")
'''


def test_demo_writes_report_table_and_plot(tmp_path):
    script = tmp_path / "toy_demo.py"
    script.write_text(SCRIPT)
    out = tmp_path / "demo"
    result = run_python(str(script), str(out), str(tmp_path / "cache"), timeout=600)
    report = json.loads((out / "report.json").read_text())
    assert set(report["baseline"]) >= {"temperature", "pass@1", "pass@8", "avg", "t1"}
    assert report["baseline"]["temperature"] in (0.0, 1.0)
    assert set(report["sept"]) >= {"pass@1", "pass@8", "avg", "at_base_best_temperature"}
    assert {"offline", "coupled"} <= set(report)
    assert set(report["wall_time_s"]) >= {"base_model", "baseline_sweep", "sept_train",
                                          "sept_eval", "total"}
    assert {"mechanism_holds", "paper_claim_holds"} <= set(report["targets"])
    assert (out / "report.png").stat().st_size > 10_000
    assert "| SePT, T = 1.0 |" in (out / "report.md").read_text()
    assert "| SePT, T = 1.0 |" in result.output
    # The SePT run went through the train code path: Megatron checkpoint + HF export.
    assert (out / "sept" / "checkpoints" / "latest").exists()
    assert (out / "sept" / "hf_final" / "config.json").exists()
