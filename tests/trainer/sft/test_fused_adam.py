"""torch's fallback AdamW switched to its fused kernel (``sept_megatron/trainer/fused_adam.py``)."""

import copy

import torch

from sept_megatron.trainer.fused_adam import fuse_torch_adam_groups, use_fused_adam


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    return model, optimizer


def train(model, optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(8, 16, generator=generator)
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_fused_groups_take_the_foreach_steps_to_rounding():
    plain_model, plain_opt = model_and_optimizer()
    fused_model, fused_opt = copy.deepcopy(plain_model), None
    fused_opt = torch.optim.AdamW(fused_model.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    assert fuse_torch_adam_groups(fused_opt) == 1
    assert fused_opt.param_groups[0]["fused"] and not fused_opt.param_groups[0]["foreach"]
    train(plain_model, plain_opt, 5)
    train(fused_model, fused_opt, 5)
    for plain, fused in zip(plain_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        assert not torch.equal(fused, plain) or plain.numel() < 8  # really another kernel


def test_a_checkpoint_saved_unfused_resumes_fused():
    model, optimizer = model_and_optimizer()
    train(model, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_model, resumed = copy.deepcopy(model), None
    resumed = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["fused"] is None  # loading brought back the saved flag
    fuse_torch_adam_groups(resumed)
    assert all(state["step"].dtype == torch.float32 for state in resumed.state.values())
    train(resumed_model, resumed, 2, seed=2)
    train(model, optimizer, 2, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_cpu_keeps_the_foreach_optimizer():
    _, optimizer = model_and_optimizer()
    assert use_fused_adam(optimizer, torch.device("cpu")) == 0
    assert not optimizer.param_groups[0]["fused"]
