"""``sept-megatron plan --config RECIPE`` before the weights are on disk: the recipe's shipped
config.json (examples/models/), whose numbers are the published ones."""

import json
from pathlib import Path

import pytest
from published import PUBLISHED

from sept_megatron.plan.planner import main as plan_main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {
    "Qwen2.5-Math-7B": "qwen2.5-math-7b",
    "deepseek-math-7b-instruct": "deepseek-math-7b",
    "Qwen2.5-32B": "qwen2.5-32b",
    "Meta-Llama-3-70B-Instruct": "llama3-70b",
}
FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
)


@pytest.mark.parametrize("folder", list(SHIPPED))
def test_shipped_configs_hold_the_published_numbers(folder):
    shipped = json.loads((ROOT / "examples/models" / folder / "config.json").read_text())
    published = PUBLISHED[SHIPPED[folder]][1]
    assert {f: shipped[f] for f in FIELDS} == {f: published[f] for f in FIELDS}


@pytest.mark.parametrize(
    "recipe", ["examples/llama3-70b.yaml", "examples/paper/deepseek-math-7b-instruct-dsr.yaml"]
)
def test_plan_uses_the_shipped_config_when_the_weights_are_absent(recipe, capsys):
    nodes = 4 if "70b" in recipe else 1
    code = plan_main(
        ["--config", str(ROOT / recipe), "--nodes", str(nodes), "--gpus-per-node", "8", "--gpu-mem-gb", "80"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "is not on disk: planning with the published config.json" in out
    assert "examples/models/" in out


def test_without_a_shipped_config_the_missing_path_is_still_an_error(tmp_path):
    from sept_megatron.config import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hf_path: /models/NotShipped-1B\n")
    with pytest.raises(ConfigError, match="model.hf_path"):
        plan_main(["--config", str(recipe), "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gb", "80"])
