"""Same-device sync (TP = PP = 1, engine on the trainer's device): bitwise the bucket path's
result, with no bucket; a bf16 engine gets the same values cast; and the choice of paths."""

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer
from mp import run_python

from sept_megatron.weight_sync.gather import transports_on

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_device")
    tokenizer = make_tokenizer(root / "tok")
    make_tiny_model("qwen2", tokenizer).save_pretrained(root / "hf")  # untied: lm_head too
    tokenizer.save_pretrained(root / "hf")
    run_python("tests/weight_sync/_same_device_worker.py", root / "hf", root / "out.pt")
    return torch.load(root / "out.pt")


def test_in_place_copy_equals_the_bucket_path_bitwise(record):
    assert record["can"] and not record["can_fp8"]  # FP8 weights need the quantising stream
    assert record["buckets"] > 1 and record["written"] > 0
    assert record["in_place"].keys() == record["streamed"].keys()
    for name, tensor in record["streamed"].items():
        assert torch.equal(record["in_place"][name], tensor), name


def test_a_bf16_engine_receives_the_cast_values(record):
    for name, tensor in record["streamed"].items():
        assert record["half"][name].dtype == torch.bfloat16
        assert torch.equal(record["half"][name], tensor.to(torch.bfloat16)), name


def test_shared_memory_is_a_transport_of_cpu_ranks_only():
    assert "shared" in transports_on(torch.device("cpu"))
    assert transports_on(torch.device("cuda", 0)) == ("auto", "peer")
