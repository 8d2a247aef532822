"""SePT training launched by a real Slurm on a one-node cluster on localhost
(``slurm_cluster.py``), each a tiny TP=2 run of a few rounds:

- ``examples/sept.sbatch`` (srun, one task per rank) to completion;
- the same job told to stop (USR1 to the batch shell, as ``--signal=B:USR1@300`` does before the
  time limit) at a known moment: it checkpoints after the round, requeues itself and the
  requeued job finishes with the same prompts as the uninterrupted run; a child of each rank
  that dies on USR1 (as SGLang's schedulers do) survives, the signal reaching the ranks only;
- an endless job under a real 2-minute time limit, where Slurm's own timer sends the signal:
  stop, checkpoint, requeue, resume;
- a bare ``srun --ntasks=2`` (ranks from SLURM_PROCID/SLURM_NTASKS, no torchrun);
- a rank killed mid-round under ``srun --kill-on-bad-exit``: every rank ends, non-zero.

Needs root and Debian's ``slurm-wlm`` + ``munge``. With ``SEPT_TEST_INSTALL_SLURM=1`` (CI sets
it) missing packages are apt-get installed; otherwise the launch tests skip and say why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import slurm_cluster
from loop.test_train_cli import base_args, read_metrics, round_prompts

INSTALL_VAR = "SEPT_TEST_INSTALL_SLURM"
APT_PACKAGES = ("slurm-wlm", "munge")
SBATCH_SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "sept.sbatch"
JOB_TIMEOUT_S = 300
CHILD_SPAWNER = Path(__file__).resolve().parent / "usr1_child"  # a sitecustomize for the ranks
ROUNDS = 4  # a stop after round 1 or 2 leaves rounds for the requeued job; rounds are cheap


# --- can Slurm run here? -----------------------------------------------------------------
def slurm_unavailable_reason(environ=os.environ) -> str | None:
    """None when a local cluster can start (after installing Slurm if allowed), else why not."""
    if os.geteuid() != 0:
        return "needs root: the test cluster runs slurmctld/slurmd with SlurmUser=root"
    missing = slurm_cluster.missing_binaries()
    if not missing:
        return None
    if environ.get(INSTALL_VAR) != "1":
        return (
            f"Slurm is not installed (missing {', '.join(missing)}); set {INSTALL_VAR}=1 "
            f"to apt-get install {' '.join(APT_PACKAGES)}"
        )
    failure = apt_install(APT_PACKAGES)
    if failure:
        return failure
    missing = slurm_cluster.missing_binaries()
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def apt_install(packages: tuple[str, ...]) -> str | None:
    """``apt-get update && apt-get install -y PACKAGES``; None on success, else why it failed."""
    if slurm_cluster.find_binary("apt-get") is None:
        return f"{INSTALL_VAR}=1 but there is no apt-get to install {' '.join(packages)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"{' '.join(argv)} timed out"
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            return f"{' '.join(argv)} failed (rc={proc.returncode}): " + " | ".join(tail)
    return None


def test_skips_without_slurm_and_installs_only_when_asked(monkeypatch):
    # A machine without Slurm (nor apt-get): skip with the reason, run nothing.
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name, path=None: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    reason = slurm_unavailable_reason({})
    assert "Slurm is not installed" in reason and INSTALL_VAR in reason and "sbatch" in reason
    assert "no apt-get" in slurm_unavailable_reason({INSTALL_VAR: "1"})
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in slurm_unavailable_reason({INSTALL_VAR: "1"})

    # Asked to install, with apt-get: update, then install, as argument lists.
    calls = []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        slurm_cluster.shutil,
        "which",
        lambda name, path=None: "/usr/bin/apt-get" if name == "apt-get" else None,
    )
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda argv, **kw: calls.append((argv, kw)) or subprocess.CompletedProcess(argv, 0, "", ""),
    )
    assert "still missing" in slurm_unavailable_reason({INSTALL_VAR: "1"})
    assert [argv for argv, _ in calls] == [["apt-get", "update"], ["apt-get", "install", "-y", *APT_PACKAGES]]
    assert all(not kw.get("shell") and kw["env"]["DEBIAN_FRONTEND"] == "noninteractive" for _, kw in calls)


# --- the launches ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm_installed():
    # Session scope, and first in each launch test's arguments, so that a skip comes before
    # the session's other fixtures (the tiny checkpoint) are built.
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(slurm_installed, tmp_path_factory):
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def job_env(cluster_env: dict[str, str], **extra: str) -> dict[str, str]:
    """What a job sees (sbatch and srun export the submitter's environment): this
    interpreter's bin dir first on PATH, and no torchrun variables to shadow Slurm's."""
    env = {
        k: v
        for k, v in cluster_env.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)
    return env


def fast_run_args(inputs: Path, run_dir: Path) -> list[str]:
    # Checkpoints and the HF export are the loop tests' business; here they only cost time.
    return base_args(inputs, run_dir, ROUNDS) + [
        "checkpoint.save_every_n_rounds=0",
        "checkpoint.export_hf=false",
    ]


def wait_for_job(job_id: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    """Poll until the job leaves the queue; return its ``scontrol show job`` fields."""
    deadline = time.monotonic() + timeout
    while subprocess.run(
        ["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True
    ).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            pytest.fail(f"job {job_id} still queued or running after {timeout} s")
        time.sleep(0.2)
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def submit(env: dict[str, str], workdir: Path, config: Path, args: list[str], *sbatch_options: str) -> str:
    """``sbatch examples/sept.sbatch CONFIG ARGS`` with two tasks on the one node; the job id."""
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            f"--chdir={workdir}",
            f"--output={workdir}/sept-%j.out",
            *sbatch_options,
            str(SBATCH_SCRIPT),
            str(config),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def tp2_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text("parallel:\n  tensor_parallel: 2\n")
    return config


@pytest.fixture(scope="module")
def sbatch_run(slurm_installed, cluster, tiny_run_inputs, tmp_path_factory):
    """An uninterrupted run of examples/sept.sbatch: (run dir, job fields, job output)."""
    workdir = tmp_path_factory.mktemp("sbatch")
    run_dir = workdir / "run"
    env = job_env(cluster, MASTER_PORT=str(slurm_cluster.free_port()))
    job_id = submit(env, workdir, tp2_config(workdir), fast_run_args(tiny_run_inputs, run_dir))
    job = wait_for_job(job_id, env, JOB_TIMEOUT_S)
    return run_dir, job, (workdir / f"sept-{job_id}.out").read_text(errors="replace")


@pytest.mark.slow
def test_sbatch_example_trains_to_completion(sbatch_run):
    run_dir, job, output = sbatch_run
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output[-4000:]
    assert [m["round"] for m in read_metrics(run_dir)] == list(range(1, ROUNDS + 1))
    assert job["Requeue"] == "1" and job["Restarts"] == "0"  # requeueable, never requeued


@pytest.mark.slow
def test_stop_signal_checkpoints_requeues_and_resumes(sbatch_run, cluster, tiny_run_inputs, tmp_path):
    # What SLURM does at --signal=B:USR1@300 before the time limit, sent at a known moment:
    # `scancel --batch` signals the batch shell only, as the B: prefix does. Each rank spawns a
    # child that dies on USR1, as SGLang's schedulers do: the stop must reach the ranks only.
    run_dir = tmp_path / "run"
    children = tmp_path / "children"
    children.mkdir()
    env = job_env(
        cluster,
        MASTER_PORT=str(slurm_cluster.free_port()),
        SEPT_TEST_CHILD_DIR=str(children),
        PYTHONPATH=os.pathsep.join([str(CHILD_SPAWNER), os.environ.get("PYTHONPATH", "")]),
    )
    job_id = submit(env, tmp_path, tp2_config(tmp_path), fast_run_args(tiny_run_inputs, run_dir))
    out_file = tmp_path / f"sept-{job_id}.out"
    # Rank 0 logs the question bank after every rank has installed its handler, before round 1.
    wait_for(
        lambda: out_file.exists() and "question bank" in out_file.read_text(errors="replace"),
        JOB_TIMEOUT_S,
        "question bank line in the job output",
    )
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    job = wait_for_job(job_id, env, JOB_TIMEOUT_S)
    output = out_file.read_text(errors="replace")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    # The first run stopped at a round boundary with a checkpoint, exit 75, and requeued itself;
    # the requeued run (same command) resumed from that checkpoint and finished.
    stopped = re.search(r"stopped after round (\d+) on SIGUSR1", output)
    assert stopped and 1 <= int(stopped.group(1)) < ROUNDS, output[-4000:]
    # srun reports 75, or 143 when --kill-on-bad-exit ended a rank still exiting after another.
    assert re.search(r"stopped early \(exit (75|143)\): requeueing job", output), output[-4000:]
    assert "restart 1" in output
    assert f"at round {stopped.group(1)}" in output, output[-4000:]
    # Both ranks' children were alive when their rank stopped: USR1 never reached them.
    assert {p.name: p.read_text() for p in children.glob("*restart0.txt")} == {
        "rank0-restart0.txt": "alive",
        "rank1-restart0.txt": "alive",
    }, output[-4000:]
    rounds = [m["round"] for m in read_metrics(run_dir)]
    assert rounds == list(range(1, ROUNDS + 1)), rounds
    reference_dir = sbatch_run[0]
    for r in range(1, ROUNDS + 1):
        assert round_prompts(run_dir, r) == round_prompts(reference_dir, r)


@pytest.mark.slow
def test_time_limit_signal_stops_requeues_and_resumes(slurm_installed, cluster, tiny_run_inputs, tmp_path):
    # Slurm's own timer this time: a 2-minute limit with the stop signal asked for 120 s before
    # it, so it is due at once and Slurm (which checks every 30 s) sends it to the batch shell
    # within the first half minute, maybe before the ranks are up (the script repeats it). The
    # run is endless: only the signal can end the first job.
    run_dir = tmp_path / "run"
    env = job_env(cluster, MASTER_PORT=str(slurm_cluster.free_port()))
    endless = fast_run_args(tiny_run_inputs, run_dir) + ["train.rounds=100000"]
    job_id = submit(env, tmp_path, tp2_config(tmp_path), endless, "--time=2", "--signal=B:USR1@120")
    out_file = tmp_path / f"sept-{job_id}.out"
    wait_for(
        lambda: out_file.exists() and "resumed from" in out_file.read_text(errors="replace"),
        JOB_TIMEOUT_S,
        "the requeued job resuming",
    )
    restarts = job_fields(job_id, env)["Restarts"]
    subprocess.run(["scancel", job_id], env=env, check=True)  # the resumed job would run on
    output = out_file.read_text(errors="replace")
    stopped = re.search(r"stopped after round (\d+) on SIGUSR1", output)
    assert stopped and "USR1: asking the ranks to stop" in output, output[-4000:]
    assert restarts == "1" and f"at round {stopped.group(1)}" in output, output[-4000:]


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.2)


@pytest.mark.slow
def test_bare_srun_ranks_come_from_slurm(slurm_installed, cluster, tiny_run_inputs, tmp_path):
    env = job_env(cluster, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(slurm_cluster.free_port()))
    srun = ["srun", "--ntasks=2", "--kill-on-bad-exit=1", f"--chdir={tmp_path}"]
    run_dir = tmp_path / "run"
    # No RANK/WORLD_SIZE in the environment (job_env), and TP=2 needs a world of two: finishing
    # proves launch_env read SLURM_PROCID/SLURM_NTASKS and both ranks joined one process group.
    trained = subprocess.run(
        [
            *srun,
            sys.executable,
            "-m",
            "sept_megatron.cli",
            "train",
            *fast_run_args(tiny_run_inputs, run_dir),
            "parallel.tensor_parallel=2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    assert [m["round"] for m in read_metrics(run_dir)] == list(range(1, ROUNDS + 1))


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_without_requeue(slurm_installed, cluster, tiny_run_inputs, tmp_path):
    run_dir = tmp_path / "run"
    env = job_env(cluster, MASTER_PORT=str(slurm_cluster.free_port()))
    endless = fast_run_args(tiny_run_inputs, run_dir) + ["train.rounds=1000"]
    job_id = submit(env, tmp_path, tp2_config(tmp_path), endless)
    wait_for(
        lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip(),
        JOB_TIMEOUT_S,
        "round 1",
    )
    ranks = job_ranks(run_dir)
    assert sorted(ranks) == [0, 1], ranks
    ranks[1].kill()
    killed_at = time.monotonic()
    job = wait_for_job(job_id, env, 120)
    elapsed = time.monotonic() - killed_at
    output = (tmp_path / f"sept-{job_id}.out").read_text(errors="replace")
    # srun --kill-on-bad-exit ended rank 0; a crash without a stop request is not requeued.
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", output[-3000:]
    assert job["Restarts"] == "0" and "requeueing" not in output, output[-3000:]
    assert not psutil.wait_procs(list(ranks.values()), timeout=5)[1]
    assert elapsed < 60, elapsed


def job_ranks(run_dir: Path) -> dict[int, psutil.Process]:
    """This test's rank processes, by their unique run dir on the command line (only ours)."""
    ranks = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if f"logging.run_dir={run_dir}" in cmdline and "sept_megatron.cli" in cmdline:
            ranks[int(proc.environ()["SLURM_PROCID"])] = proc
    return ranks
