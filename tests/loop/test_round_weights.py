"""The online refresh, checked by outcome: every round is generated from the weights the
previous round trained.

One `sept-megatron train` run (3 rounds, one process, the CPU direct sync) under
``_round_weights.py``: before each round's rollout, a checksum of every engine tensor equals
that of the trainer's weights exported as HF tensors, and the round's samples equal those a
fresh transformers model holding the trainer's weights draws with the round's sampling
parameters. A loop that skipped a sync, synced before the optimizer steps, or sampled from a
stale or different model fails here, whatever order its calls come in.
"""

import itertools
import json

import pytest
from mp import run_python

pytestmark = pytest.mark.slow

ROUNDS = 3


@pytest.fixture(scope="module")
def checked_rounds(tiny_run_inputs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("round_weights")
    out = run_dir / "rounds.json"
    run_python(
        "tests/loop/_round_weights.py",
        out,
        f"model.hf_path={tiny_run_inputs / 'hf'}",
        f"data.train_files={tiny_run_inputs / 'train.jsonl'}",
        f"train.rounds={ROUNDS}",
        "train.prompts_per_round=4",
        "train.mini_batch_size=4",
        "train.micro_batch_size=2",
        "rollout.n=2",
        "data.max_response_length=8",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        "train.drop_truncated=false",
        f"logging.run_dir={run_dir / 'run'}",
        "logging.progress=false",
        "checkpoint.export_hf=false",
        timeout=400,
    )
    record = json.loads(out.read_text())
    assert record["rc"] == 0
    return record["rounds"]


def test_every_round_starts_with_the_engine_holding_the_trainers_weights(checked_rounds):
    assert [r["round"] for r in checked_rounds] == list(range(1, ROUNDS + 1))
    for r in checked_rounds:
        assert r["engine"].keys() == r["trainer"].keys(), f"round {r['round']}: tensor names differ"
        stale = [name for name in r["trainer"] if r["engine"][name] != r["trainer"][name]]
        assert not stale, (
            f"round {r['round']}: the engine's {stale[:3]} (of {len(stale)}) differ "
            "from the trainer's weights: the previous round's sync did not land"
        )
    # Not vacuous: training moved the weights between every two rounds.
    for before, after in itertools.pairwise(checked_rounds):
        moved = [name for name in before["trainer"] if before["trainer"][name] != after["trainer"][name]]
        assert moved, f"round {after['round']}: the weights did not change"


def test_every_rounds_samples_come_from_the_trainers_weights(checked_rounds):
    for r in checked_rounds:
        assert len(r["samples"]) == 4 * 2
        assert r["samples"] == r["reference"], (
            f"round {r['round']}: the samples are not those of the trainer's current weights"
        )
    # Sampled, not copied: the rounds' answers differ (new weights, new seeds, new tau_s).
    assert len({json.dumps(r["samples"]) for r in checked_rounds}) == ROUNDS
