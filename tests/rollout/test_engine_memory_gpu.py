"""On CUDA, the hf engine's release_memory() parks the model in host memory and returns the
cached blocks, so Megatron's SFT step can use them; resume_memory() brings it back and
generation continues where it was (greedy output unchanged). The loop's ordering of these calls
is tested on CPU in tests/loop/test_engine_memory.py."""

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer

from sept_megatron.rollout import SamplingParams
from sept_megatron.rollout.hf import HFRolloutEngine

# CUDA itself is the subject (release/resume are no-ops on the CPU), also under
# SEPT_GPU_TEST_DEVICE=cpu.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA: release/resume are no-ops on the CPU"
    ),
]

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


def test_release_frees_the_gpu_and_resume_restores_generation(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    model = make_tiny_model(
        "qwen2",
        tokenizer,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
    )
    engine = HFRolloutEngine(
        model=model, tokenizer=tokenizer, device="cuda", dtype=torch.bfloat16, progress=False
    )
    prompts = [tokenizer.encode("Compute 3 * 4 + 5."), tokenizer.encode("Compute 7 - 2.")]
    before = engine.generate(prompts, GREEDY)
    param_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    engine.release_memory()
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    assert allocated - torch.cuda.memory_allocated() >= param_bytes
    assert torch.cuda.memory_reserved() < reserved  # freed blocks went back, not to the cache
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate(prompts, GREEDY)

    engine.resume_memory()
    assert all(p.device.type == "cuda" for p in engine.model.parameters())
    assert engine.generate(prompts, GREEDY) == before
