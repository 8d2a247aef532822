"""Strict compat mode: tensors made without a device fail on the CPU where CUDA would fail.

A real 2-process gloo world (torchrun) probes every boundary: tensor collectives, batched
point-to-point, and a Megatron model's forward. Explicit devices, explicit gloo groups and
object collectives pass; factory tensors without a device, ``.cpu()`` results and host-only
arithmetic are refused.
"""

import json

import pytest
from mp import run_torchrun

pytestmark = pytest.mark.slow

EXPECTED_REFUSED = {
    "all_reduce_factory_without_device": True,
    "all_reduce_after_cpu": True,
    "all_reduce_result_of_host_math": True,
    "broadcast_host": True,
    "all_gather_host": True,
    "batch_isend_irecv_host": True,
    "model_forward_host_tokens": True,
    "the_original_is_untouched_by_cuda": True,
    "all_reduce_on_compute_device": False,
    "all_reduce_host_moved_to_device": False,
    "all_reduce_mixed_math": False,
    "all_reduce_on_explicit_gloo_group": False,
    "batch_isend_irecv_placed": False,
    "all_gather_object_host": False,
    "model_forward_placed_tokens": False,
}


@pytest.fixture(scope="module")
def probes(tiny_run_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("strict") / "probes.json"
    run_torchrun(
        2,
        "tests/runtime/compat/_worker.py",
        str(tiny_run_inputs / "hf"),
        str(out),
        env={"SEPT_COMPAT_STRICT": "1", "SEPT_DEVICE": "cpu"},
    )
    return json.loads(out.read_text())


def test_strict_mode_is_on(probes):
    assert probes["strict"] is True


@pytest.mark.parametrize("probe", sorted(EXPECTED_REFUSED))
def test_boundary(probes, probe):
    assert probes[probe] is EXPECTED_REFUSED[probe], (
        f"{probe}: {'refused' if probes[probe] else 'accepted'}, expected "
        f"{'refused' if EXPECTED_REFUSED[probe] else 'accepted'}"
    )
