"""Conversion acceptance, through the real tools in real processes, for every family.

HF -> Megatron -> HF is bit-identical, Megatron's fp32 logits match transformers within 1e-4,
and a checkpoint written at TP=2 loads at TP=1 and PP=2 with the same logits. Two launches
do all of it (``_worker.py``): 2 processes for TP=2 and PP=2, then 1 process for TP=1 (which
also reloads the TP=2 checkpoints in a world of one).
"""

import json

import pytest
import torch
from hf_checkpoints import LLAMA3_ROPE, MODELS
from mp import run_python, run_torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sept_megatron.convert.workflows import probe_tokens

pytestmark = pytest.mark.slow

LAYOUTS = ["tp1pp1", "tp2pp1", "tp1pp2"]
LOGIT_TOLERANCE = 1e-4  # fp32; what tools/check_logits.py accepts by default
RELOAD_TOLERANCE = 1e-5  # same weights, different TP/PP: only the reduction order differs


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """Work dir with every checkpoint, export and logits file, plus the tools' results."""
    work = tmp_path_factory.mktemp("converted")
    run_torchrun(2, "tests/convert/_worker.py", hf_models, work)
    run_python("tests/convert/_worker.py", hf_models, work)
    results = {"check_logits": {}}
    for world in (1, 2):
        found = json.loads((work / f"results-world{world}.json").read_text())
        results["check_logits"].update(found.pop("check_logits"))
        results.update(found)
    return work, results


def hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODELS)
def test_round_trip_is_bit_identical(name, layout, hf_models, converted):
    work, _ = converted
    original = hf_tensors(hf_models / name)
    exported = hf_tensors(work / f"{name}-{layout}-hf")
    assert sorted(exported) == sorted(original)
    for tensor_name, tensor in original.items():
        assert exported[tensor_name].dtype == tensor.dtype, tensor_name
        assert torch.equal(exported[tensor_name], tensor), f"{tensor_name} differs"


@pytest.mark.parametrize("name", MODELS)
def test_export_is_a_complete_hf_checkpoint(name, hf_models, converted):
    """Sharded files + index, the config and the tokenizer: transformers loads it as is."""
    work, _ = converted
    export = work / f"{name}-tp2pp1-hf"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 1  # the small --max-shard-size-gb split it
    assert all((export / f).is_file() for f in shard_files)
    assert (export / "tokenizer.json").is_file()
    assert json.loads((export / "config.json").read_text()) == json.loads(
        (hf_models / name / "config.json").read_text()
    )
    reloaded = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(hf_models / name, local_files_only=True)
    for (key, value), (other_key, other) in zip(reloaded.state_dict().items(), original.state_dict().items()):
        assert key == other_key and torch.equal(value, other), key


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODELS)
def test_megatron_logits_match_transformers(name, layout, converted):
    _, results = converted
    check = results["check_logits"][f"{name}/{layout}"]
    assert check["max_diff"] is not None and check["max_diff"] <= LOGIT_TOLERANCE, check
    assert check["rc"] == 0


def test_check_logits_fails_for_another_models_weights(converted):
    _, results = converted
    negative = results["negative"]
    assert negative["rc"] != 0
    assert negative["max_diff"] > 100 * LOGIT_TOLERANCE


@pytest.mark.parametrize("layout", ["tp1pp2-world2", "tp1pp1-world1"])
@pytest.mark.parametrize("name", MODELS)
def test_tp2_checkpoint_loads_at_other_layouts(name, layout, converted):
    work, _ = converted
    reference = torch.load(work / "logits" / f"{name}-from-tp2pp1-at-tp2pp1-world2.pt")["logits"]
    resharded = torch.load(work / "logits" / f"{name}-from-tp2pp1-at-{layout}.pt")["logits"]
    assert resharded.shape == reference.shape
    assert (resharded - reference).abs().max() <= RELOAD_TOLERANCE


def test_llama3_rope_frequencies_match_transformers(hf_models, converted):
    work, _ = converted
    hf = AutoModelForCausalLM.from_pretrained(hf_models / "llama3", local_files_only=True)
    expected = hf.model.rotary_emb.inv_freq
    for path in sorted((work / "logits").glob("llama3-*.pt")):
        torch.testing.assert_close(
            torch.load(path)["inv_freq"], expected, rtol=1e-6, atol=0, msg=f"{path.name}"
        )
    unscaled = 1.0 / LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16)
    assert not torch.allclose(expected, unscaled)  # the scaling really changes frequencies


def test_llama3_rope_scaling_is_visible_at_the_logit_tolerance(hf_models):
    """Without this, a converter that dropped the rope scaling could still pass at 1e-4."""
    scaled = AutoModelForCausalLM.from_pretrained(hf_models / "llama3", local_files_only=True)
    config = scaled.config
    config.rope_parameters = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
    unscaled = type(scaled)(config).eval()
    unscaled.load_state_dict(scaled.state_dict())
    tokens = probe_tokens(str(hf_models / "llama3"), config.vocab_size, 32)
    with torch.no_grad():
        diff = (scaled(tokens).logits - unscaled(tokens).logits).abs().max()
    assert diff > 10 * LOGIT_TOLERANCE
