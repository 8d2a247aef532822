"""train.offload_during_rollout: the trainer's state leaves the device and comes back bitwise;
a run that offloads between steps takes exactly the steps of one that does not."""

import json

import pytest
from hf_tiny import make_tiny_model, make_tokenizer
from mp import run_python

pytestmark = pytest.mark.slow


def test_offloaded_state_comes_back_bitwise(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    make_tiny_model("llama", tokenizer).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    run_python("tests/trainer/sft/_offload_worker.py", tmp_path / "hf", tmp_path / "out.json")
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["storages_empty"] and record["bytes_parked"] > 0
    assert all(record["restored"])
    assert record["parked"] == record["plain"]  # losses bitwise
    assert record["same_weights"]
