"""SDPAttention (model.attention=sdpa): Megatron's core-attention interface over PyTorch SDPA.

On CPU in fp32 it must equal Megatron's DotProductAttention to 1e-5 (outputs and gradients; MHA,
GQA, MQA; TP=1 and TP=2; causal and padding masks), the whole model must match transformers as
the unfused path does, and one forward + backward at sequence 1024 must keep no [b*heads, s, s]
scores. Two launches of ``_attention_worker.py`` (a world of 2 and a world of 1).
"""

import json

import pytest
import torch
from hf_tiny import make_tiny_model
from mp import run_python, run_torchrun

from sept_megatron.config import ConfigError, load_config, validate
from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.arch import ModelArch

WORKER = "tests/trainer/model/_attention_worker.py"
MODULE_TOLERANCE = 1e-5  # fp32, SDPA vs DotProductAttention
LOGIT_TOLERANCE = 1e-4  # fp32, Megatron vs transformers (as tools/check_logits.py)


class StubVocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 300


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    # GQA with q/k/v biases (qwen2) and q/k norms with head_dim != hidden / heads (qwen3).
    for family, extra in (("qwen2", {}), ("qwen3", {"head_dim": 32})):
        make_tiny_model(family, StubVocab(), initializer_range=0.1, **extra).save_pretrained(
            root / "hf" / family
        )
    out = root / "parity.json"
    run_torchrun(2, WORKER, "parity", root / "hf", out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention_memory") / "memory.json"
    run_python(WORKER, "memory", out)
    return json.loads(out.read_text())


# --- the layer spec ------------------------------------------------------------------------
def arch() -> ModelArch:
    from hf_tiny import tiny_config

    return arch_from_hf_config(tiny_config("qwen2", StubVocab()))


def core_attention_of(spec):
    return spec.submodules.self_attention.submodules.core_attention


def test_local_spec_defaults_to_sdpa_and_keeps_unfused_reachable():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from sept_megatron.trainer.attention import SDPAttention

    assert core_attention_of(mdl.layer_spec(arch(), transformer_engine=False)) is SDPAttention
    unfused = mdl.layer_spec(arch(), transformer_engine=False, attention="unfused")
    assert core_attention_of(unfused) is DotProductAttention
    with pytest.raises(ValueError, match="model.attention='flash'"):
        mdl.layer_spec(arch(), transformer_engine=False, attention="flash")


def test_config_validates_model_attention(tmp_path):
    cfg = load_config(None, [f"model.hf_path={tmp_path}", "model.attention=flash"])
    with pytest.raises(ConfigError, match=r"model.attention='flash': choose one of sdpa, unfused"):
        validate(cfg, world_size=1)
    assert load_config(None, []).model.attention == "sdpa"


# --- masks ---------------------------------------------------------------------------------
def test_causal_layers_run_is_causal_without_a_mask_tensor():
    from megatron.core.transformer.enums import AttnMaskType

    from sept_megatron.trainer.attention import _mask_arguments

    assert _mask_arguments(AttnMaskType.causal, mdl.causal_mask(8), 8, 8) == (True, None)
    assert _mask_arguments(AttnMaskType.causal, None, 8, 8) == (True, None)
    mask = torch.rand(2, 1, 8, 8) < 0.5
    is_causal, sdpa_mask = _mask_arguments(AttnMaskType.padding, mask, 8, 8)
    assert not is_causal and torch.equal(sdpa_mask, ~mask)  # SDPA: True = attend


def test_a_causal_layer_refuses_a_mask_that_is_not_plain_causal():
    from megatron.core.transformer.enums import AttnMaskType

    from sept_megatron.trainer.attention import _mask_arguments

    padded = mdl.causal_mask(8).clone()
    padded[..., 6:] = True  # a left-padding-style mask: is_causal alone would be wrong
    with pytest.raises(ValueError, match="not the plain causal one"):
        _mask_arguments(AttnMaskType.causal, padded, 8, 8)
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 8, 4\)"):
        _mask_arguments(AttnMaskType.causal, torch.zeros(1, 1, 8, 4, dtype=torch.bool), 8, 8)
    with pytest.raises(ValueError, match="equal query/key lengths"):
        _mask_arguments(AttnMaskType.causal, None, 1, 8)


# --- numbers ---------------------------------------------------------------------------------
def test_module_matches_dot_product_attention(parity):
    cases = parity["module"]
    assert len(cases) == 2 * 3 * 2  # TP=1/2 x MHA/GQA/MQA x causal/padding
    for case, diffs in cases.items():
        assert max(diffs.values()) <= MODULE_TOLERANCE, (case, diffs)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_whole_model_at_tp2_matches_transformers(parity, family):
    result = parity["model"][family]
    assert result["sdpa_vs_transformers"] <= LOGIT_TOLERANCE, result
    assert result["sdpa_vs_unfused"] <= MODULE_TOLERANCE, result
    assert result["unfused_vs_transformers"] <= LOGIT_TOLERANCE, result


def test_sdpa_keeps_no_seq_squared_scores(memory):
    """Unfused keeps at least the fp32 probabilities of every layer ([b, heads, s, s]) for
    backward; SDPA keeps none of them, so its peak is lower by at least that much."""
    scores_per_layer = memory["batch"] * memory["heads"] * memory["seq"] ** 2 * 4
    print(
        f"\npeak allocation of one forward+backward at seq {memory['seq']} (hidden "
        f"{memory['hidden']}, {memory['layers']} layers, {memory['heads']} heads):"
    )
    for run, result in memory.items():
        if isinstance(result, dict):
            print(f"  {run:18s} {result['peak_bytes'] / 2**20:7.1f} MiB  {result['seconds_median']:.2f} s")
    unfused, sdpa = memory["unfused/none"]["peak_bytes"], memory["sdpa/none"]["peak_bytes"]
    assert unfused - sdpa >= memory["layers"] * scores_per_layer
    assert sdpa < unfused / 3


def test_recompute_lowers_the_peak(memory):
    """Selective recomputation drops unfused attention's kept scores (the layer being
    back-propagated recomputes its own, so the peak falls by less than all layers' worth);
    full recomputation keeps only each layer's input. With SDPA there are no scores to drop."""
    peak = {run: result["peak_bytes"] for run, result in memory.items() if isinstance(result, dict)}
    scores_per_layer = memory["batch"] * memory["heads"] * memory["seq"] ** 2 * 4
    assert peak["unfused/none"] - peak["unfused/selective"] >= scores_per_layer / 2
    assert peak["sdpa/full"] < peak["sdpa/none"]
    assert peak["sdpa/selective"] <= peak["sdpa/none"]
