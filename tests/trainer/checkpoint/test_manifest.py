"""Checkpoint manifests: what verification finds, which checkpoint a resume picks, and the
``sept-megatron checkpoint verify`` exit codes, on checkpoint-shaped directories (no model).

The same functions on real checkpoints written by the CLI: test_damaged_checkpoint.py."""

import json
import os

import pytest

from sept_megatron.cli import main as cli_main
from sept_megatron.trainer import integrity


def fake_checkpoint(path, shard_bytes: int = 4096, seed: int = 0):
    """A checkpoint-shaped dir: metadata, two shards, Megatron's .metadata, then its manifest
    written as rank 0 publishes it (rank 0's shard digested by its 'writer' beforehand)."""
    (path / "model").mkdir(parents=True)
    (path / integrity.META_FILE).write_text(json.dumps({"round": seed}))
    (path / "model" / ".metadata").write_bytes(b"meta" * 10)
    for rank in (0, 1):
        (path / "model" / f"__{rank}_0.distcp").write_bytes(os.urandom(shard_bytes))
    assert integrity.digest_rank_shards(str(path / "model"), 0)
    total = integrity.write_manifest(str(path))
    assert not list((path / "model").glob(".manifest-rank*"))  # parts merged and removed
    assert total == sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != integrity.MANIFEST_FILE
    )
    return path


def run_root(tmp_path, rounds=(1, 2, 3)):
    root = tmp_path / "checkpoints"
    for r in rounds:
        fake_checkpoint(root / f"round_{r:06d}", seed=r)
    (root / integrity.LATEST_FILE).write_text(f"round_{rounds[-1]:06d}\n")
    return root


def flip_a_bit(path, offset: int = 100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_complete_checkpoint_verifies(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c")
    manifest = integrity.read_manifest(str(ckpt))
    assert set(manifest["files"]) == {
        integrity.META_FILE,
        "model/.metadata",
        "model/__0_0.distcp",
        "model/__1_0.distcp",
    }
    assert integrity.verify_checkpoint(str(ckpt)) == []


def test_truncated_shard_is_named_with_both_sizes(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c")
    os.truncate(ckpt / "model" / "__1_0.distcp", 100)
    (problem,) = integrity.verify_checkpoint(str(ckpt), checksums=False)
    assert "__1_0.distcp" in problem and "100 bytes" in problem and "4096" in problem


def test_flipped_bit_is_found_by_the_checksum_only(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c")
    flip_a_bit(ckpt / "model" / "__0_0.distcp")
    assert integrity.verify_checkpoint(str(ckpt), checksums=False) == []
    (problem,) = integrity.verify_checkpoint(str(ckpt))
    assert "__0_0.distcp" in problem and "CRC32" in problem


def test_ranks_share_the_checksums(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c")
    flip_a_bit(ckpt / "model" / "__0_0.distcp")
    found = [integrity.verify_checkpoint(str(ckpt), share=(rank, 3)) for rank in range(3)]
    assert sum(len(f) for f in found) == 1  # exactly one rank read that file


def test_missing_file_and_unreadable_manifest(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c")
    (ckpt / "model" / "__1_0.distcp").unlink()
    assert any("__1_0.distcp: missing" in p for p in integrity.verify_checkpoint(str(ckpt)))
    (ckpt / integrity.MANIFEST_FILE).write_text("{trunc")
    assert any("unreadable manifest" in p for p in integrity.verify_checkpoint(str(ckpt)))


def test_resume_takes_latest_when_complete(tmp_path):
    root = run_root(tmp_path)
    choice = integrity.choose_resume_checkpoint(str(root))
    assert choice.path == str(root / "round_000003") and choice.passed_over == []


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = run_root(tmp_path)
    os.truncate(root / "round_000003" / "model" / "__0_0.distcp", 100)
    flip_a_bit(root / "round_000002" / "model" / "__1_0.distcp")
    choice = integrity.choose_resume_checkpoint(str(root))
    assert choice.path == str(root / "round_000001")
    assert [p for p, _ in choice.passed_over] == [str(root / "round_000003"), str(root / "round_000002")]
    assert "round_000003" in choice.describe_fallback()


def test_no_complete_checkpoint_is_an_error_naming_each_file(tmp_path):
    root = run_root(tmp_path, rounds=(4,))  # keep_last=1: nothing to fall back on
    flip_a_bit(root / "round_000004" / "model" / "__1_0.distcp")
    with pytest.raises(integrity.CheckpointDamaged, match=r"__1_0\.distcp.*CRC32"):
        integrity.choose_resume_checkpoint(str(root))


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    assert integrity.choose_resume_checkpoint(str(tmp_path)).path is None


def test_verify_command_exit_codes(tmp_path, capsys):
    root = run_root(tmp_path)
    assert cli_main(["checkpoint", "verify", str(root)]) == 0
    assert cli_main(["checkpoint", "verify", str(root / "round_000002")]) == 0
    os.truncate(root / "round_000002" / "model" / "__0_0.distcp", 10)
    assert cli_main(["checkpoint", "verify", str(tmp_path)]) == 1  # the run dir
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "round_000002/model/__0_0.distcp: 10 bytes" in out
    assert "2 of 3 checkpoint(s) complete" in out
    assert cli_main(["checkpoint", "verify", str(tmp_path / "nothing")]) == 2


def test_space_check_compares_free_space_with_the_last_save(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "free_bytes", lambda path: 3 << 20)
    assert integrity.space_problem(str(tmp_path), 2 << 20) is None
    problem = integrity.space_problem(str(tmp_path), 5 << 20)
    assert "3.0 MiB free" in problem and "5.0 MiB" in problem
    assert integrity.space_problem(str(tmp_path), None) is None  # first save: nothing to compare


def test_free_space_of_a_directory_not_made_yet_is_its_parents(tmp_path):
    # A run's first save (or the bench's, which removes its root between saves) asks before
    # the checkpoint root exists.
    assert integrity.free_bytes(str(tmp_path / "not" / "yet")) == integrity.free_bytes(str(tmp_path))
