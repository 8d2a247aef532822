"""Transformer Engine FP8 training on a Hopper GPU: each recipe's SFT losses stay within 2% of
BF16 on the same data, its logits within FP8 tolerance of BF16's (and not equal: FP8 ran), and
a checkpoint saved mid-run resumes with the same FP8 state and the same next loss.

These need CUDA, compute capability >= 9.0 and Transformer Engine; without them every test
skips with the reason (:func:`sept_megatron.trainer.fp8.fp8_unsupported_reason`). TE is a
~276 MB wheel that the GPU machine this project is tested on cannot install, so there these
tests skip too: they are written against TE's and Megatron-Core's real APIs and have not run.
"""

import json

import pytest
import torch
from hf_tiny import make_tiny_model
from mp import run_torchrun

from sept_megatron.trainer.fp8 import fp8_unsupported_reason

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

FP8_RECIPES = ["delayed", "tensorwise", "blockwise"]
LOSS_TOLERANCE = 0.02  # the issue's: within 2% of BF16, step by step
LOGIT_TOLERANCE = 0.1  # relative L2 error of the logits: e4m3 keeps 3 mantissa bits (2^-4)


class Vocab512:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 512


def skip_unless_fp8_runs(recipe: str) -> None:
    reason = fp8_unsupported_reason(recipe)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not any(fp8_unsupported_reason(r) is None for r in FP8_RECIPES):
        pytest.skip(fp8_unsupported_reason("delayed"))
    root = tmp_path_factory.mktemp("te_fp8")
    # Every GEMM dimension a multiple of 128, so that all three recipes (blockwise included)
    # take the shapes: hidden 256, 4 heads x 64 (2 KV heads), ffn 512.
    model = make_tiny_model(
        "llama",
        Vocab512(),
        seed=0,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        initializer_range=0.05,
    )
    model.save_pretrained(root / "hf")
    run_torchrun(
        1, "tests/trainer/fp8/_te_fp8_worker.py", root / "hf", root, timeout=900, env={"SEPT_DEVICE": "cuda"}
    )
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_sft_losses_within_2_percent_of_bf16(recipe, results):
    skip_unless_fp8_runs(recipe)
    _, found = results
    bf16, fp8 = found["bf16"]["losses"], found[recipe]["losses"]
    assert len(bf16) == len(fp8) >= 3
    assert bf16[-1] < bf16[0]  # the steps train: there is a trajectory to follow
    for step, (reference, value) in enumerate(zip(bf16, fp8)):
        assert abs(value - reference) <= LOSS_TOLERANCE * abs(reference), (step, value, reference)


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_logits_within_fp8_tolerance_of_bf16(recipe, results):
    skip_unless_fp8_runs(recipe)
    root, _ = results
    bf16 = torch.load(root / "logits-bf16.pt", weights_only=True)
    fp8 = torch.load(root / f"logits-{recipe}.pt", weights_only=True)
    assert fp8.shape == bf16.shape and torch.isfinite(fp8).all()
    relative = float((fp8 - bf16).norm() / bf16.norm())
    assert 0 < relative <= LOGIT_TOLERANCE, relative  # > 0: the GEMMs really ran in FP8


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_checkpoint_resumes_with_its_scaling_state(recipe, results):
    skip_unless_fp8_runs(recipe)
    _, found = results
    run = found[recipe]
    assert run["extra_state_at_save"], "no Transformer Engine module found"
    assert run["extra_state_after_load"] == run["extra_state_at_save"]
    continued = run["losses"][3]  # the worker saved after 3 steps (SAVE_AFTER)
    assert abs(run["resumed_loss"] - continued) <= 1e-5 * abs(continued), (run["resumed_loss"], continued)
