"""The NCCL / SGLang process environment (rollout/sglang_env.py), against sglang 0.5.21.

Real SGLang code: ``ServerArgs`` (the engine argument that memory-saver CUDA graphs need) and
``sglang.srt.environ.envs`` (the variables exist under these names and parse to the values we
mean). ``sglang.Engine``'s own environment side effects are mimicked by the recorder
(tests/rollout/sglang_recorder.py, citing srt/entrypoints/engine.py).
"""

from __future__ import annotations

import json

import pytest
from sglang_source import require_sglang

from sept_megatron.rollout.sglang_engine import engine_kwargs
from sept_megatron.rollout.sglang_env import SGLANG_PROCESS_ENV, set_sglang_environment


@pytest.fixture(scope="module", autouse=True)
def _sglang():
    require_sglang()


def test_every_variable_is_set_and_a_users_value_wins():
    env = {"NCCL_NVLS_ENABLE": "1"}
    applied = set_sglang_environment(env)
    assert applied == dict(SGLANG_PROCESS_ENV, NCCL_NVLS_ENABLE="1") == env


def test_sglang_reads_our_values(monkeypatch):
    from sglang.srt.environ import envs

    for name, value in SGLANG_PROCESS_ENV.items():
        monkeypatch.setenv(name, value)
    assert envs.SGLANG_MEMORY_SAVER_CUDA_GRAPH.get() is True
    assert envs.SGLANG_JIT_DEEPGEMM_PRECOMPILE.get() is False
    assert envs.SGLANG_JIT_DEEPGEMM_FAST_WARMUP.get() is True


def test_memory_saver_graphs_get_non_breakable_prefill(tmp_path):
    from sglang.srt.server_args import ServerArgs

    (tmp_path / "config.json").write_text("{}")
    args = ServerArgs(**engine_kwargs(str(tmp_path)))
    assert args.cuda_graph_backend_prefill == "disabled"
    assert args.enable_memory_saver is True


def _env_of_ranks(*flags: str) -> list[dict]:
    from mp import run_torchrun

    result = run_torchrun(2, "tests/rollout/_sglang_env_worker.py", *flags, timeout=300)
    line = next(l for l in result.output.splitlines() if l.startswith("ENV "))
    return json.loads(line[4:])


@pytest.mark.slow
def test_owner_and_non_owner_ranks_end_with_the_same_environment():
    owner, other = _env_of_ranks()
    assert owner == other == SGLANG_PROCESS_ENV
    # Without the setting, constructing the engine on the owner alone makes them differ.
    owner, other = _env_of_ranks("--no-sglang-env")
    assert owner["NCCL_CUMEM_ENABLE"] == "0" and other["NCCL_CUMEM_ENABLE"] is None
