"""``train.recompute`` (Megatron's activation recomputation) changes memory, never the numbers:
one SFT step with selective or full recomputation gives the loss and the gradients of the step
without it, also with dropout on (which needs the RNG states restored for the recomputed
forward: compat's CPU RNG tracker and its stand-in for the CUDA generator state). One launch of
``_recompute_worker.py``; the settings it maps to are checked here without a launch."""

import json

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer
from mp import run_python

from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.trainer import model as mdl

pytestmark = pytest.mark.slow

WORKER = "tests/trainer/sft/_recompute_worker.py"
TOLERANCE = 1e-6  # fp32; the recomputed forward runs the same ops on the same inputs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("recompute")
    tokenizer = make_tokenizer(root / "tokenizer")
    make_tiny_model("qwen2", tokenizer, initializer_range=0.1).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(4):
        prompt = torch.randint(4, len(tokenizer), (5 + i,), generator=generator).tolist()
        response = torch.randint(4, len(tokenizer), (6 + 2 * i,), generator=generator).tolist()
        samples.append({"prompt_ids": prompt, "response_ids": response + [tokenizer.eos_token_id]})
    (root / "samples.json").write_text(json.dumps({"samples": samples, "pad_id": tokenizer.pad_token_id}))
    out = root / "results.json"
    run_python(WORKER, root / "hf", root / "samples.json", out)
    return json.loads(out.read_text())


def test_recompute_modes_map_to_megatron_settings():
    assert mdl.recompute_kwargs("none") == {}
    assert mdl.recompute_kwargs("selective") == {
        "recompute_granularity": "selective",
        "recompute_modules": ["core_attn"],
    }
    assert mdl.recompute_kwargs("full") == {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }
    with pytest.raises(ValueError, match="train.recompute='some'"):
        mdl.recompute_kwargs("some")


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_transformer_config_carries_the_recompute_setting(recompute):
    from hf_tiny import tiny_config

    class Vocab:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

        def __len__(self):
            return 300

    arch = arch_from_hf_config(tiny_config("llama", Vocab()))
    config = mdl.transformer_config(arch, recompute=recompute)
    assert config.recompute_granularity == recompute
    assert mdl.transformer_config(arch).recompute_granularity is None


def test_every_mode_ran_with_its_granularity(results):
    assert len(results) == 10
    for name, result in results.items():
        recompute = name.split("/")[1]
        assert result["granularity"] == (None if recompute == "none" else recompute), name
        assert result["grad_max"] > 0, name


@pytest.mark.parametrize(
    "name",
    [
        "sdpa/selective/dropout0.0",
        "sdpa/full/dropout0.0",
        "unfused/selective/dropout0.0",
        "sdpa/selective/dropout0.1",
        "sdpa/full/dropout0.1",
        "unfused/selective/dropout0.1",
    ],
)
def test_recompute_gives_the_same_step(results, name):
    attention, _, dropout = name.split("/")
    reference = results[f"{attention}/none/{dropout}"]
    result = results[name]
    assert result["loss"] == pytest.approx(reference["loss"], abs=TOLERANCE)
    assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=TOLERANCE)
    assert result["grad_diff"] <= TOLERANCE * max(1.0, result["grad_max"]), result
    assert result["weight_diff"] <= TOLERANCE, result


def test_dropout_was_really_on(results):
    """The dropout runs must differ from the dropout-free ones, or they would test nothing."""
    for attention in ("sdpa", "unfused"):
        with_dropout = results[f"{attention}/none/dropout0.1"]["loss"]
        without = results[f"{attention}/none/dropout0.0"]["loss"]
        assert abs(with_dropout - without) > 1e-3
