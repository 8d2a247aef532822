"""A damaged checkpoint through the real CLI on the tiny model: a truncated shard of the latest
checkpoint is passed over for the previous one (kept by checkpoint.keep_last=2), said in the log
and the metrics, and the rerun ends with the weights of the run that never stopped; a flipped
bit with nothing to fall back on stops the run with an error naming the file, before training."""

import os
import shutil

import pytest
from loop.test_train_cli import base_args, read_metrics, run_train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROUNDS = 5


def final_weights(run_dir):
    tensors = {}
    for path in sorted((run_dir / "hf_final").glob("*.safetensors")):
        tensors |= load_file(str(path))
    return tensors


@pytest.fixture(scope="module")
def finished_run(tiny_run_inputs, tmp_path_factory):
    """An uninterrupted run (checkpoints of its last two rounds kept, final HF export)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_train(base_args(tiny_run_inputs, run_dir, rounds=ROUNDS) + ["checkpoint.keep_last=2"])
    return run_dir


def test_truncated_shard_falls_back_and_matches_an_uninterrupted_run(tiny_run_inputs, finished_run, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "hf_final")
    shard = run_dir / "checkpoints" / f"round_{ROUNDS:06d}" / "model" / "__0_0.distcp"
    os.truncate(shard, 100)  # the repro: one shard of the latest checkpoint cut short

    _, output = run_train(base_args(tiny_run_inputs, run_dir, rounds=ROUNDS))
    assert "passed over damaged checkpoint" in output and str(shard) in output
    assert (
        f"resumed from {run_dir / 'checkpoints' / f'round_{ROUNDS - 1:06d}'} at round {ROUNDS - 1}" in output
    )
    assert read_metrics(run_dir)[-1]["checkpoint/fallbacks"] == 1
    # The last round trained again from the previous checkpoint: the same final weights.
    ours, expected = final_weights(run_dir), final_weights(finished_run)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert ours[name].equal(tensor), name


def test_flipped_bit_without_an_older_checkpoint_is_an_error_naming_the_file(
    tiny_run_inputs, finished_run, tmp_path
):
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"round_{ROUNDS - 1:06d}")  # as with keep_last=1
    shard = run_dir / "checkpoints" / f"round_{ROUNDS:06d}" / "model" / "__0_1.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))

    rc, output = run_train(base_args(tiny_run_inputs, run_dir, rounds=ROUNDS), expect_ok=False)
    assert rc == 1
    assert f"{shard}: CRC32" in output and "corrupted" in output
    assert "Traceback" not in output
    assert len(read_metrics(run_dir)) == ROUNDS  # nothing trained on the damaged checkpoint

    verify = __import__("subprocess").run(
        [__import__("sys").executable, "-m", "sept_megatron.cli", "checkpoint", "verify", str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 1 and "DAMAGED" in verify.stdout and str(shard) in verify.stdout
