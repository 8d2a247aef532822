"""The planner's resident-state terms, in bytes per parameter.

Megatron's mixed-precision Adam keeps fp32 master weights and both fp32 moments: 12 bytes per
bf16 parameter; fp32 parameters are their own master, 8 bytes. The main-grad buffer is fp32
(4 bytes) either way and the weights take their dtype's size. The CPU measurement of
test_memory_estimate.py is fp32-dominated and its tolerance has room for a wrong term; this
checks each term exactly, for one GPU (no sharding) and for the distributed optimizer over DP.
"""

from __future__ import annotations

import pytest
from published import write_config

from sept_megatron.config import load_config
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.plan import memory
from sept_megatron.plan import planner as plan
from sept_megatron.trainer.model import padded_vocab_size

# (params dtype, weights, gradients, optimizer) bytes per parameter
BYTES_PER_PARAM = [("float32", 4, 4, 8), ("bfloat16", 2, 4, 12)]


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("published"), "qwen2.5-math-7b")
    return arch_from_hf_config(load_hf_config(str(path)))


def resident_terms(arch, dtype: str, gpus: int, *overrides: str) -> tuple[dict[str, float], int]:
    """Bytes per parameter of the weights, gradients and optimizer lines, and the parameters
    counted from the architecture (one GPU's share with TP = PP = 1)."""
    cfg = load_config(
        None,
        [
            f"model.params_dtype={dtype}",
            "train.mini_batch_size=8",
            "train.micro_batch_size=1",
            "train.prompts_per_round=8",
            *overrides,
        ],
    )
    kernels = plan.resolve_kernels(cfg, arch, on_gpu=True, te_available=True)
    result = plan.estimate(cfg, arch, plan.Hardware(1, gpus, 1e6), kernels)
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    params = memory.param_counts(arch, padded).total
    lines = {l.label.split(":")[0]: l.gib * plan.GIB / params for l in result.stages[0].training if l.counted}
    return lines, params


@pytest.mark.parametrize("dtype,weights,grads,optimizer", BYTES_PER_PARAM)
def test_weights_gradients_and_adam_state_per_parameter(arch, dtype, weights, grads, optimizer):
    per_param, params = resident_terms(arch, dtype, 1)
    assert params > 7e9  # the 7B model (padded vocab)
    assert per_param["weights"] == pytest.approx(weights, rel=1e-9)
    assert per_param["gradients"] == pytest.approx(grads, rel=1e-9)
    assert per_param["optimizer"] == pytest.approx(optimizer, rel=1e-9)


@pytest.mark.parametrize("dtype,weights,grads,optimizer", BYTES_PER_PARAM)
def test_distributed_optimizer_shards_only_the_adam_state(arch, dtype, weights, grads, optimizer):
    per_param, _ = resident_terms(arch, dtype, 4, "parallel.use_distributed_optimizer=true")
    assert per_param["weights"] == pytest.approx(weights, rel=1e-9)
    assert per_param["gradients"] == pytest.approx(grads, rel=1e-9)
    assert per_param["optimizer"] == pytest.approx(optimizer / 4, rel=1e-9)
