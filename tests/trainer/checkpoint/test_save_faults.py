"""A full disk during a save, through the real CLI on the tiny model.

ENOSPC is injected at the write calls of one file of round 2's save
(tests/trainer/checkpoint/_faulty_disk_train.py: Megatron's shard writer in its forked process, torch
DCP's ``.metadata``, our metadata file, the ``latest`` pointer), so these run everywhere; a real
full disk (a small tmpfs) runs where the test may mount one (root, as in CI). Each time the
partial save is never published and ``latest`` keeps naming round 1's complete checkpoint;
``checkpoint.on_save_error=stop`` ends the run with an error naming the path and the space
needed, ``warn`` trains on and the next save succeeds.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from loop.test_train_cli import base_args, read_metrics, run_train, train_env
from mp import REPO_ROOT

pytestmark = pytest.mark.slow

LAUNCHER = REPO_ROOT / "tests" / "trainer" / "checkpoint" / "_faulty_disk_train.py"


def faulty_train(args: list[str], **fault: str) -> tuple[int, str]:
    env = train_env({"FAULT_ENOSPC_ROUNDS": "2", **fault})
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, env=env, timeout=600
    )
    return proc.returncode, proc.stdout + proc.stderr


def args_for(inputs: Path, run_dir: Path, *extra: str) -> list[str]:
    return base_args(inputs, run_dir, rounds=3) + ["checkpoint.export_hf=false", *extra]


def assert_round_two_unpublished(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "round_000001"
    assert not list(root.glob(".tmp-*"))  # the partial save was removed
    from sept_megatron.trainer.integrity import verify_checkpoint

    assert verify_checkpoint(str(root / "round_000001")) == []


@pytest.mark.parametrize(
    "target,async_save",
    [
        ("__0_0.distcp", "true"),  # a tensor shard, in Megatron's background writer
        ("__0_0.distcp", "false"),  # the same, written synchronously
        (".metadata.tmp", "true"),  # torch DCP's global metadata (finalize, rank 0)
        ("sept_megatron_ckpt.json", "true"),  # ours, at publish
        (".latest.tmp", "true"),  # the pointer, after the rename
    ],
)
def test_enospc_stops_the_run_naming_path_and_space(tiny_run_inputs, tmp_path, target, async_save):
    run_dir = tmp_path / "run"
    rc, output = faulty_train(
        args_for(tiny_run_inputs, run_dir, f"checkpoint.async_save={async_save}"), FAULT_ENOSPC_FILE=target
    )
    assert rc == 1, output[-3000:]
    assert "sept-megatron train: error: checkpoint save to" in output
    assert str(run_dir / "checkpoints" / "round_000002") in output
    assert "no space left on the device" in output and "a checkpoint needs about" in output
    assert "Traceback" not in output
    assert_round_two_unpublished(run_dir)


def test_after_a_full_disk_the_rerun_resumes_from_the_last_complete_checkpoint(tiny_run_inputs, tmp_path):
    run_dir = tmp_path / "run"
    rc, _ = faulty_train(args_for(tiny_run_inputs, run_dir), FAULT_ENOSPC_FILE="__0_0.distcp")
    assert rc == 1
    _, output = run_train(args_for(tiny_run_inputs, run_dir))
    assert "at round 1" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "round_000003"


def test_warn_keeps_training_and_the_next_save_succeeds(tiny_run_inputs, tmp_path):
    run_dir = tmp_path / "run"
    rc, output = faulty_train(
        args_for(tiny_run_inputs, run_dir, "checkpoint.on_save_error=warn"), FAULT_ENOSPC_FILE="__0_0.distcp"
    )
    assert rc == 0, output[-3000:]
    assert "no space left on the device" in output and "training goes on" in output
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "round_000003"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("round_")) == [
        "round_000001",
        "round_000003",
    ]  # round 2's save was dropped, not published
    failures = {m["round"]: m["checkpoint/save_failures"] for m in read_metrics(run_dir)}
    assert failures[1] == 0 and failures[3] == 1


def test_too_little_free_space_is_found_before_the_save_starts(tiny_run_inputs, tmp_path):
    run_dir = tmp_path / "run"
    rc, output = faulty_train(args_for(tiny_run_inputs, run_dir), FAULT_FREE_MIB="0.5")
    assert rc == 1, output[-3000:]
    assert "round_000002 not started" in output and "0.5 MiB free" in output
    assert_round_two_unpublished(run_dir)


def test_real_full_disk_on_a_small_tmpfs(tiny_run_inputs, tmp_path):
    if os.geteuid() != 0:
        pytest.skip(
            "mounting a tmpfs needs root (CI runs as root); the injected-ENOSPC tests "
            "above cover the same paths"
        )
    mount = Path(f"/tmp/sept-full-disk-{uuid.uuid4().hex[:8]}")
    mount.mkdir()
    # 1 MiB: the run's logs fit, one checkpoint (~1.6 MiB for the tiny model) does not.
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        run_dir = mount / "run"
        rc, output = run_train(args_for(tiny_run_inputs, run_dir), expect_ok=False)
        assert rc == 1, output[-3000:]
        assert str(run_dir / "checkpoints" / "round_000001") in output
        assert "no space left on the device" in output
        root = run_dir / "checkpoints"
        assert not (root / "latest").exists() and not list(root.glob("*round_*"))
        assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["round"] == 1
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()
