"""The run logger: W&B panels read back from an offline run, and no W&B at all where it
must not be (non-zero ranks, ``wandb_mode=disabled``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from wandb_offline import read_offline_run

from sept_megatron.config import Config, ConfigError, LoggingConfig, validate

ROWS = [
    {
        "index": i,
        "prompt": f"q{i}",
        "response": f"a{i}",
        "tau_s": 0.5,
        "prompt_tokens": 3,
        "response_tokens": 2 + i,
        "finish_reason": "stop" if i else "length",
    }
    for i in range(3)
]

NO_WANDB_SCRIPT = """
import json, os, sys
from sept_megatron.config import LoggingConfig
from sept_megatron.logging import NullRunLogger, build_logger

run_dir, mode, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = LoggingConfig(run_dir=run_dir, wandb_mode=mode, samples_every=1, progress=False)
logger = build_logger(cfg, {"a": 1}, rank)
assert isinstance(logger, NullRunLogger) == (rank != 0)
logger.log({"train/loss": 1.0}, step=1)
logger.save_samples(1, json.loads(sys.argv[4]))
logger.log_table("t", ["x"], [[1]], step=1)
logger.log_line_plot("p", [0.0, 1.0], {"a": [1.0, None]}, title="t", x_label="T")
logger.log_image("i", __file__)
logger.set_summary({"best": 1})
with logger.progress(3, 0, "x") as bar:
    bar.update(1)
logger.finish()
print(json.dumps({"wandb_imported": "wandb" in sys.modules, "files": sorted(os.listdir(run_dir))
                  if os.path.isdir(run_dir) else []}))
"""


def run_without_wandb(tmp_path, mode: str, rank: int) -> dict:
    script = tmp_path / "no_wandb.py"
    script.write_text(NO_WANDB_SCRIPT)
    run_dir = tmp_path / f"run-{mode}-{rank}"
    proc = subprocess.run(
        [sys.executable, str(script), str(run_dir), mode, str(rank), json.dumps(ROWS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_non_zero_ranks_get_a_no_op_that_never_imports_wandb(tmp_path):
    # Even with W&B asked for: only rank 0 may start a run or write a file.
    result = run_without_wandb(tmp_path, "offline", rank=1)
    assert result == {"wandb_imported": False, "files": []}


def test_disabled_writes_the_files_and_never_imports_wandb(tmp_path):
    result = run_without_wandb(tmp_path, "disabled", rank=0)
    assert result == {"wandb_imported": False, "files": ["config.json", "metrics.jsonl", "samples"]}


def test_offline_run_holds_group_job_type_panels_and_summary(tmp_path):
    from sept_megatron.logging import RunLogger

    png = tmp_path / "plot.png"
    _write_png(png)
    run_dir = tmp_path / "exp-42"
    cfg = LoggingConfig(
        run_dir=str(run_dir),
        wandb_mode="offline",
        wandb_job_type="train",
        run_name="r",
        samples_every=2,
        progress=False,
    )
    logger = RunLogger(cfg, {"train": {"lr": 0.1}})
    for step in (1, 2):
        logger.log({"train/loss": 1.0 / step}, step=step)
        logger.save_samples(step, ROWS)
    logger.log_line_plot(
        "eval/curves",
        [0.0, 0.5, 1.0],
        {"AVG": [0.2, 0.4, 0.3], "p32": [None, 0.5, 0.6]},
        title="c",
        x_label="temperature",
        step=3,
    )
    logger.log_image("eval/sweep", str(png), step=3)
    logger.set_summary({"eval/best_temperature": 0.5})
    logger.finish()

    run = read_offline_run(run_dir)
    assert (run.group, run.job_type, run.name) == ("exp-42", "train", "r")  # group: the dir name
    assert run.config["train"] == {"lr": 0.1}
    assert run.history[1]["train/loss"] == 1.0 and run.history[2]["train/loss"] == 0.5
    assert "rollout/samples" not in run.history[1]  # samples_every=2: round 2 only
    columns, data = run.table(run.history[2]["rollout/samples"])
    assert columns == ["question", "answer", "response_tokens", "finish_reason", "tau_s"]
    assert data == [[r["prompt"], r["response"], r["response_tokens"], r["finish_reason"], 0.5] for r in ROWS]
    # W&B's line chart: a lineseries spec in the config and its table in the history.
    spec = run.config["_wandb"]["visualize"]["eval/curves"]["panel_config"]
    assert spec["panelDefId"] == "wandb/lineseries/v0" and spec["stringSettings"]["xname"] == "temperature"
    _, points = run.table(run.history[3]["eval/curves_table"])
    assert sorted(map(tuple, points)) == sorted(
        [(0.0, "AVG", 0.2), (0.5, "AVG", 0.4), (1.0, "AVG", 0.3), (0.5, "p32", 0.5), (1.0, "p32", 0.6)]
    )
    image = run.history[3]["eval/sweep"]
    assert image["_type"] == "image-file" and (run.run_dir / "files" / image["path"]).is_file()
    assert run.summary["eval/best_temperature"] == 0.5
    # The JSONL files are written as before.
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


def _write_png(path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1], [1, 0])
    figure.savefig(path)
    plt.close(figure)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("samples_every", -1, "logging.samples_every=-1: must be >= 0"),
        ("peak_tflops", 0.0, "logging.peak_tflops=0.0: must be > 0"),
        ("wandb_group", "x" * 129, "logging.wandb_group="),
        ("wandb_job_type", "", "logging.wandb_job_type=''"),
    ],
)
def test_bad_logging_fields_are_named(field, value, message):
    cfg = Config()
    cfg.model.hf_path = "/m"
    setattr(cfg.logging, field, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(cfg, world_size=1)


def test_a_resumed_run_logs_each_round_once(tmp_path):
    """A run killed after logging round 2 but before its checkpoint was published resumes at
    round 1 and logs round 2 again: the rewind drops the first record of it."""
    from sept_megatron.logging import RunLogger

    logger = RunLogger(LoggingConfig(run_dir=str(tmp_path), wandb_mode="disabled"), {})
    for step in (1, 2):
        logger.log({"train/loss": float(step)}, step=step)
    logger.rewind(1)
    logger.log({"train/loss": 2.5}, step=2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["train/loss"]) for r in lines] == [(1, 1.0), (2, 2.5)]


OFFLINE_SCRIPT = """
import json, sys
from sept_megatron.config import LoggingConfig
from sept_megatron.logging import RunLogger

if __name__ == "__main__":  # the W&B process is spawned: it imports this file too
    cfg = LoggingConfig(run_dir=sys.argv[1], wandb_mode="offline", samples_every=1, progress=False)
    logger = RunLogger(cfg, {"a": 1})
    logger.log({"train/loss": 0.25}, step=1)
    logger.save_samples(1, json.loads(sys.argv[2]))
    logger.finish()
    print(json.dumps({"wandb_imported": "wandb" in sys.modules}))
"""


def test_rank_0_logs_to_wandb_without_importing_it(tmp_path):
    """W&B runs in a process of its own: the training process (Megatron's forks of checkpoint
    writers, the engine's GIL) carries none of its imports, and the run still holds the data."""
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE_SCRIPT)
    run_dir = tmp_path / "exp"
    proc = subprocess.run(
        [sys.executable, str(script), str(run_dir), json.dumps(ROWS)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"wandb_imported": False}
    run = read_offline_run(run_dir)
    assert run.history[1]["train/loss"] == 0.25
    assert run.table(run.history[1]["rollout/samples"])[0][0] == "question"


def test_a_wandb_run_that_cannot_start_is_a_clear_error(tmp_path):
    from sept_megatron.logging import RunLogger

    cfg = LoggingConfig(
        run_dir=str(tmp_path / "r"), wandb_mode="offline", wandb_project="a/b", progress=False
    )
    with pytest.raises(RuntimeError, match=r"W&B did not start \(.*\); logging.wandb_mode=offline"):
        RunLogger(cfg, {})


KILLED_SCRIPT = """
import os, signal, sys, time
from sept_megatron.config import LoggingConfig
from sept_megatron.logging import RunLogger

if __name__ == "__main__":
    cfg = LoggingConfig(run_dir=sys.argv[1], wandb_mode="offline", progress=False)
    logger = RunLogger(cfg, {})
    logger.log({"train/loss": 0.5}, step=1)
    print(logger._wandb._process.pid, flush=True)
    time.sleep(2)  # the queue's feeder thread hands the record over
    os.kill(os.getpid(), signal.SIGKILL)  # no finish(), no atexit: the OOM killer's way
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\\tZ" not in next(line for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return False


def test_a_killed_trainer_leaves_no_wandb_process_and_keeps_what_arrived(tmp_path):
    import time

    from sept_megatron.logging import ORPHAN_CHECK_S

    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    run_dir = tmp_path / "exp"
    proc = subprocess.run(
        [sys.executable, str(script), str(run_dir)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 4 * ORPHAN_CHECK_S + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(pid), "the W&B process of a killed trainer is still running"
    assert read_offline_run(run_dir).history[1]["train/loss"] == 0.5
