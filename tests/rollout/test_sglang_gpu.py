"""SGLang on one GPU: SePT rounds (generate at tau_s, SFT on the answers, sync), and after each
sync SGLang's greedy tokens equal the hf backend's on the same weights for 32 tokens.

Needs CUDA and SGLang's kernels (``pip install -e .[gpu]``); skips cleanly otherwise. It has not
run in this project yet: the GPU machine it could use has no network and no sglang-kernel wheel
(README, "SGLang rollout").
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer
from sglang_source import require_sglang

from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.rollout import SamplingParams
from sept_megatron.rollout.hf import HFRolloutEngine
from sept_megatron.weight_sync.plan import plan_buckets, sync_plan

pytestmark = pytest.mark.gpu
TOKENS = 32
ROUNDS = 3


@pytest.fixture(scope="module")
def sglang_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    require_sglang()
    if importlib.util.find_spec("sgl_kernel") is None:
        pytest.skip("SGLang's CUDA kernels (sglang-kernel) are not installed: pip install -e .[gpu]")
    try:
        import sglang.srt.entrypoints.engine  # noqa: F401
    except Exception as error:  # a broken GPU install is reported, not hidden
        pytest.skip(f"sglang.Engine does not import here: {error!r}")


def buckets_of(model, bucket_mb: float = 1.0):
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    plan = sync_plan(arch_from_hf_config(model.config), pipeline_parallel=1)
    return [
        [(name, state[name].to(torch.bfloat16)) for item in bucket for name in item.hf_names]
        for bucket in plan_buckets(plan, int(bucket_mb * (1 << 20)), element_size=2)
    ]


def sft_step(model, optimizer, prompts, generations) -> float:
    """One plain SFT step (token-mean NLL on response tokens, prompt masked), as SePT trains."""
    losses = []
    for prompt, (generation,) in zip(prompts, generations):
        ids = torch.tensor([list(prompt) + generation.token_ids], device="cuda")
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        losses.append(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :]))
    loss = torch.stack(losses).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)


def test_sept_rounds_with_sglang_match_hf_greedy(sglang_gpu, tmp_path):
    from sept_megatron.rollout.sglang_engine import SGLangRolloutEngine
    from sept_megatron.weight_sync.sglang_ipc import load_buckets

    tokenizer = make_tokenizer(tmp_path / "tok")
    # head_dim 64: SGLang's attention kernels do not take the 16 of the CPU tests' tiny models.
    model = make_tiny_model(
        "qwen2",
        tokenizer,
        hidden_size=256,
        intermediate_size=512,
        head_dim=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked logits: greedy ties between kernels are unlikely
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    trainer = model.to("cuda", torch.float32).train()
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in ("Compute 3 * 4 + 5.", "Compute (12 + 7) * 3 - 45.", "Compute 2 + 2.")
    ]
    sglang = SGLangRolloutEngine(str(tmp_path / "hf"), mem_fraction_static=0.3, seed=0)
    hf = HFRolloutEngine(
        model=copy.deepcopy(trainer).eval(),
        tokenizer=tokenizer,
        device="cuda",
        dtype=torch.bfloat16,
        progress=False,
    )
    greedy = SamplingParams(temperature=0.0, max_new_tokens=TOKENS)
    try:
        for round_index in range(ROUNDS):
            answers = sglang.generate(
                prompts, SamplingParams(temperature=0.6, max_new_tokens=TOKENS, seed=round_index)
            )
            sglang.release_memory()
            sft_step(trainer, optimizer, prompts, answers)
            assert load_buckets(sglang, buckets_of(trainer)) > 1
            sglang.resume_memory()
            hf.update_weights(buckets_of(trainer), strict=True)
            ours, reference = sglang.generate(prompts, greedy), hf.generate(prompts, greedy)
            for got, want in zip(ours, reference):
                assert got[0].token_ids[:TOKENS] == want[0].token_ids[:TOKENS], round_index
                assert got[0].finish_reason == want[0].finish_reason
    finally:
        sglang.shutdown()
