"""Engine data parallelism in the SePT loop: two processes, one real hf engine each, give the
round data one engine gives (token ids, bitwise), with the trainer at TP=2 or DP=2."""

import json

import pytest
from mp import run_python, run_torchrun

pytestmark = pytest.mark.slow


def records(path, nproc: int) -> list[dict]:
    return [json.loads(path.with_name(f"{path.name}.rank{rank}").read_text()) for rank in range(nproc)]


@pytest.fixture(scope="module")
def one_engine(tiny_run_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_engine") / "rollout.json"
    run_python("tests/loop/_rollout_worker.py", tiny_run_inputs, out, 1, 1)
    (record,) = records(out, 1)
    assert record["engines"] == 1
    return record


@pytest.mark.parametrize("layout", [("2", "1"), ("1", "1")], ids=["tp2", "dp2"])
def test_two_engines_give_the_round_data_of_one(one_engine, tiny_run_inputs, tmp_path, layout):
    out = tmp_path / "rollout.json"
    run_torchrun(2, "tests/loop/_rollout_worker.py", tiny_run_inputs, out, *layout)
    rank0, rank1 = records(out, 2)
    assert rank0["engines"] == 2
    assert rank0 == rank1  # every rank trains on the same batch
    for key in ("rounds", "offline", "validation"):
        assert rank0[key] == one_engine[key], key


def test_the_round_data_is_really_sampled(one_engine):
    first, second = one_engine["rounds"]
    assert first["questions"] != second["questions"]
    responses = [tuple(response) for _, response in first["samples"]]
    assert len(responses) == 16  # 8 questions x n=2
    assert len(set(responses)) > 8  # two copies of a question are drawn independently
    assert one_engine["validation"]["val/avg"] >= 0
