"""Transformer Engine detection and pinning, on CPU with stand-in ``transformer_engine`` modules.

A real TE needs CUDA; what is tested here is the decision: ``auto`` picks TE only when
``transformer_engine.pytorch`` imports *and* a tiny TE layer runs (TE's own ``__init__``
swallows the ImportError of a torch extension built against another torch), FP8 support is
asked through ``transformer_engine.pytorch.quantization`` (``.fp8`` is deprecated from TE
2.10), and setup.py's [gpu] extra asks for the TE range megatron-core declares.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import types
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from sept_megatron.trainer import fp8 as fp8_training
from sept_megatron.trainer import model as mdl

REPO = Path(__file__).resolve().parents[3]


def install_fake_te(monkeypatch, *, pytorch_imports: bool = True, layer_runs: bool = True):
    package = types.ModuleType("transformer_engine")  # `import transformer_engine` succeeds
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    if not pytorch_imports:
        monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # ImportError
        return

    class Linear(torch.nn.Linear):
        def __init__(self, n_in, n_out, params_dtype=None, device=None):
            super().__init__(n_in, n_out)  # CPU stand-in for a TE layer on CUDA

        def forward(self, inputs):
            if not layer_runs:
                raise RuntimeError("CUDA error: no kernel image is available for execution")
            return super().forward(inputs.float())

    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.__path__ = []
    pytorch.Linear = Linear
    package.pytorch = pytorch
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", pytorch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *a, device=None, **k: real_ones(*a, **k))


@pytest.mark.parametrize(
    "pytorch_imports,layer_runs,expected", [(False, False, False), (True, False, False), (True, True, True)]
)
def test_auto_picks_te_only_when_a_te_layer_runs(monkeypatch, pytorch_imports, layer_runs, expected):
    install_fake_te(monkeypatch, pytorch_imports=pytorch_imports, layer_runs=layer_runs)
    if not pytorch_imports:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mdl.use_transformer_engine("auto") is expected
    assert mdl.use_transformer_engine("local") is False


def test_fp8_support_is_asked_without_the_deprecated_module(monkeypatch):
    install_fake_te(monkeypatch)
    quantization = types.ModuleType("transformer_engine.pytorch.quantization")

    class FP8GlobalStateManager:
        @staticmethod
        def is_fp8_available():
            return True, ""

        @staticmethod
        def is_fp8_block_scaling_available():
            return False, "needs Hopper"

    quantization.FP8GlobalStateManager = FP8GlobalStateManager
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.quantization", quantization)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.fp8", None)  # gone / must not load
    assert fp8_training._te_verdict("delayed") == (True, "")
    assert fp8_training._te_verdict("blockwise") == (False, "needs Hopper")


def _gpu_extra() -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)["gpu"]
    raise AssertionError("setup.py has no extras_require")


def test_gpu_extra_pins_te_to_what_megatron_core_declares():
    declared = [
        Requirement(r)
        for r in importlib.metadata.requires("megatron-core") or []
        if r.startswith("transformer-engine")
    ]
    assert declared, "megatron-core declares no transformer-engine requirement"
    ours = [Requirement(r) for r in _gpu_extra() if r.startswith("transformer-engine")]
    assert len(ours) == 1 and "pytorch" in ours[0].extras
    assert ours[0].specifier == declared[0].specifier, (ours[0], declared[0])
