"""SGLang 0.5.21's KV-pool formula (rollout/sglang_memory.py) against SGLang's own function.

``KVCacheConfigurator._profile_available_bytes`` is taken from the installed source (its module
imports torchvision, which cannot load on CPU; see sglang_source.py) and run with the memory
probes answering the numbers of the four recipes: free memory at engine start and after the
weights load. The planner's pool line must be SGLang's figure.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from plan.published import write_config
from sglang_source import require_sglang, sglang_definitions

from sept_megatron.config import load_config
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.plan import planner as plan
from sept_megatron.rollout import sglang_memory
from sept_megatron.rollout.sglang_memory import (
    engine_pool_gib,
    fraction_for_pool,
    kv_pool_gib,
    largest_fraction,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = {"qwen2.5-math-7b": 1, "deepseek-math-7b": 1, "qwen2.5-32b": 2, "llama3-70b": 4}
H100 = 80.0


@pytest.fixture(scope="module", autouse=True)
def _sglang():
    require_sglang()


def sglang_pool_gib(free_at_start: float, free_after_load: float, fraction: float) -> float:
    """What SGLang's own ``_profile_available_bytes`` returns (bytes -> GiB) for a text model."""
    import logging

    from sglang.srt.environ import envs

    namespace = {
        "gc": gc,
        "math": math,
        "envs": envs,
        "logger": logging.getLogger("sglang"),
        "get_available_gpu_memory": lambda device, gpu_id, **_: free_after_load,
        "get_parallel": lambda: SimpleNamespace(
            launch_world_size=1, world_group=SimpleNamespace(cpu_group=None)
        ),
        "get_schedule": lambda: SimpleNamespace(mem_fraction_static=fraction),
        "get_mm": lambda: SimpleNamespace(mm_feature_transport=None),
    }
    sglang_definitions(
        "srt/mem_cache/kv_cache_configurator.py",
        ["mm_runtime_reservation_gb", "KVCacheConfigurator._profile_available_bytes"],
        namespace,
    )
    configurator = SimpleNamespace(
        device="cuda",
        gpu_id=0,
        mambaish_config=None,
        post_capture_kv_active=False,
        model_config=SimpleNamespace(is_multimodal=False),
    )
    return namespace["_profile_available_bytes"](configurator, free_at_start) / (1 << 30)


@pytest.mark.parametrize(
    "free_at_start,weights,fraction",
    [(76.0, 14.2, 0.24), (76.0, 6.44, 0.48), (76.0, 7.63, 0.21), (76.0, 16.4, 0.29), (40.0, 10.0, 0.5)],
)
def test_transcription_is_sglangs_function(free_at_start, weights, fraction):
    theirs = sglang_pool_gib(free_at_start, free_at_start - weights, fraction)
    assert kv_pool_gib(
        free_at_start_gib=free_at_start,
        free_after_load_gib=free_at_start - weights,
        mem_fraction_static=fraction,
    ) == pytest.approx(theirs, abs=1e-6)
    assert engine_pool_gib(
        free_at_start_gib=free_at_start, engine_weights_gib=weights, mem_fraction_static=fraction
    ) == pytest.approx(theirs, abs=1e-6)


def test_sglang_refuses_where_the_pool_would_be_empty():
    with pytest.raises(ValueError, match="Raise --mem-fraction-static"):
        sglang_pool_gib(76.0, 76.0 - 30.0, 0.3)
    assert kv_pool_gib(free_at_start_gib=76.0, free_after_load_gib=46.0, mem_fraction_static=0.3) < 0


def test_fraction_bounds():
    needed = fraction_for_pool(free_at_start_gib=76.0, engine_weights_gib=14.2, pool_gib=3.5)
    assert (
        needed == 0.24
        and engine_pool_gib(free_at_start_gib=76.0, engine_weights_gib=14.2, mem_fraction_static=needed)
        >= 3.5
    )
    assert (
        engine_pool_gib(free_at_start_gib=76.0, engine_weights_gib=14.2, mem_fraction_static=needed - 0.01)
        < 3.5
    )
    assert largest_fraction(free_at_start_gib=76.0, beside_engine_gib=34.9) == 0.54


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_planners_pool_for_each_recipe_is_sglangs(recipe, tmp_path):
    cfg = load_config(str(EXAMPLES / f"{recipe}.yaml"))
    arch = arch_from_hf_config(load_hf_config(str(write_config(tmp_path, recipe))))
    hardware = plan.Hardware(RECIPES[recipe], 8, H100)
    result = plan.estimate(
        cfg, arch, hardware, plan.resolve_kernels(cfg, arch, on_gpu=True, te_available=True)
    )
    assert result.fits, result.problems
    free = H100 - hardware.reserve_gib
    for stage in result.stages:
        weights = next(l.gib for l in stage.rollout if l.label.startswith("engine weights"))
        pool = next(l.gib for l in stage.rollout if l.label.startswith("KV pool"))
        theirs = sglang_pool_gib(free, free - weights, cfg.rollout.mem_fraction_static)
        assert pool == pytest.approx(theirs, abs=1e-6) and pool > 0
        # The generate phase: SGLang's whole static footprint beside the resident trainer.
        assert stage.rollout_gib == pytest.approx(
            cfg.rollout.mem_fraction_static * free + stage.resident_gib + sglang_memory.WORKSPACE_GIB
        )
