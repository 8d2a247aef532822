"""The demo base model: built through the Megatron path, loadable as HF, cached, deterministic.

Tiny recipes only (a 1-layer, hidden-32 model, ten steps): the full recipe takes minutes and
is measured by hand on the validation split (see BaseModelRecipe).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sept_megatron.demo import base_model
from sept_megatron.demo.base_model import BaseModelRecipe, build_base_model, quick_eval, recipe_key
from sept_megatron.demo.task import build_splits

TINY = BaseModelRecipe(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    ffn_hidden_size=64,
    n_train=200,
    steps=10,
    batch_size=8,
    lr=1e-2,
    warmup_steps=2,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    return Path(build_base_model(str(cache), TINY, progress=False))


def test_result_is_a_loadable_hf_checkpoint_with_tokenizer(built):
    assert built.name == f"base-{recipe_key(TINY)}"
    tokenizer = AutoTokenizer.from_pretrained(built, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(built, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 2 * 3 + 4."}], add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()
    recipe = json.loads((built / "recipe.json").read_text())
    assert recipe["recipe"]["hidden_size"] == 32 and recipe["key"] == recipe_key(TINY)


def test_training_loss_decreased_and_export_matches_megatron(built):
    log = json.loads((built / "train_log.json").read_text())
    loss = log["loss"]
    assert len(loss) == TINY.steps
    assert sum(loss[-3:]) / 3 < loss[0] - 0.5
    assert log["held_out_nll"]["hf"] == pytest.approx(log["held_out_nll"]["megatron"], rel=1e-4)
    assert log["wall_time_s"]["total"] > 0 and log["tokens_per_s"] > 0
    assert log["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # decides the bits


def test_cache_hit_returns_without_rebuilding(built, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a complete cached build must not be rebuilt")

    monkeypatch.setattr(base_model, "_build_into", no_build)
    marker_mtime = (built / base_model.MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    assert build_base_model(str(built.parent), TINY, progress=False) == str(built)
    assert time.perf_counter() - start < 1.0
    assert (built / base_model.MARKER).stat().st_mtime_ns == marker_mtime


def test_recipe_key_is_stable_and_recipe_sensitive():
    assert recipe_key(TINY) == recipe_key(replace(TINY))
    keys = {
        recipe_key(r)
        for r in (
            TINY,
            replace(TINY, seed=1),
            replace(TINY, lr=2e-2),
            replace(TINY, family="qwen2"),
            replace(TINY, slip_rate=0.3),
        )
    }
    assert len(keys) == 5


def test_incomplete_build_is_replaced_and_staging_cleaned(tmp_path, monkeypatch):
    """Cache logic without training: a directory lacking the marker is not a hit."""

    def fake_build(out, recipe, key, progress):
        out.mkdir(parents=True)
        (out / base_model.MARKER).write_text(key)

    monkeypatch.setattr(base_model, "_build_into", fake_build)
    recipe = replace(TINY, seed=7)
    stale = tmp_path / f"base-{recipe_key(recipe)}"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half written")
    result = Path(build_base_model(str(tmp_path), recipe, progress=False))
    assert result == stale and base_model.is_complete(result)
    assert not (result / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == [stale.name]  # no staging left behind


def test_same_recipe_is_deterministic_and_other_family_builds(built, tmp_path):
    again = Path(build_base_model(str(tmp_path / "a"), TINY, progress=False))
    first, second = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (built / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()

    qwen = Path(build_base_model(str(tmp_path / "a"), replace(TINY, family="qwen2"), progress=False))
    assert qwen.parent == again.parent and qwen != again
    model = AutoModelForCausalLM.from_pretrained(qwen, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_quick_eval_reports_greedy_pass1_pass8(built):
    problems = build_splits(TINY.seed, n_train=TINY.n_train, n_val=4, n_test=0)["val"]
    result = quick_eval(str(built), problems, temperature=1.0, n=8, seed=0, max_new_tokens=16)
    assert result["questions"] == 4 and result["n"] == 8
    for name in ("greedy", "pass@1", "pass@8", "truncated"):
        assert 0.0 <= result[name] <= 1.0
    assert result["pass@8"] >= result["pass@1"]
    assert "pass@8" not in quick_eval(str(built), problems[:1], n=2, max_new_tokens=4)


@pytest.mark.parametrize(
    "field, value",
    [("family", "gpt2"), ("num_kv_heads", 3), ("lr_decay", "linear"), ("steps", 0), ("slip_rate", 1.5)],
)
def test_bad_recipe_names_the_field(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        build_base_model(str(tmp_path), replace(TINY, **{field: value}))


def test_batches_walk_epochs_and_length_grouping_cuts_padding():
    from sept_megatron.trainer.sft import Sample, padded_length

    rng = torch.Generator().manual_seed(0)
    samples = [Sample([1] * int(n), [2, 3]) for n in torch.randint(10, 70, (96,), generator=rng)]
    recipe = replace(TINY, batch_size=8, steps=24)  # two epochs of 96
    plain = list(base_model._batches(samples, recipe))
    grouped = list(base_model._batches(samples, replace(recipe, length_group=4)))
    for batches in (plain, grouped):
        assert len(batches) == 24 and all(len(b) == 8 for b in batches)
        first_epoch = [id(s) for b in batches[:12] for s in b]
        assert sorted(first_epoch) == sorted(id(s) for s in samples)  # each sample once
    assert plain == list(base_model._batches(samples, recipe))  # deterministic
    mean_padded = lambda batches: sum(padded_length(b) for b in batches) / len(batches)  # noqa: E731
    assert mean_padded(grouped) < mean_padded(plain) - 5
