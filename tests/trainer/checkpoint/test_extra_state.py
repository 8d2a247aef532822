"""FP8 checkpoints resume: Transformer Engine's ``_extra_state`` (FP8 scaling state) survives
our save/load, and its absence (checkpoints written with local layers) is not an error, while a
missing weight still is. One launch of ``_extra_state_worker.py`` (a world of one, gloo)."""

import json

import pytest
from mp import run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("extra_state")
    run_python("tests/trainer/checkpoint/_extra_state_worker.py", work)
    return json.loads((work / "results.json").read_text())


def test_saved_extra_state_is_loaded_back(results):
    assert results["extra_state_round_trip"] is True


def test_checkpoint_without_extra_state_loads_into_a_model_that_has_it(results):
    assert results["absent_extra_state_skipped"] is True
    assert results["weights_restored"] is True


def test_a_missing_weight_is_still_named(results):
    message = results["missing_weight_error"]
    assert message is not None and "decoder.final_norm.weight" in message
    assert "checkpoint lacks 1 tensor(s)" in message
