"""One run logger: metrics to JSONL and W&B, samples to JSONL, progress bars; rank 0 only.

Non-zero ranks get :class:`NullRunLogger` (nanoGPT's trick): code calls ``logger.log(...)``
everywhere without ``if rank == 0``. Nothing secret is ever logged: the config holds no
credentials, and W&B reads its key from its own environment/netrc.

W&B runs in a process of its own (:class:`_WandbProcess`), started only when
``logging.wandb_mode`` is not ``disabled``: the training process never imports wandb. Callers
hand the logger plain data (metrics, rows, series, a PNG path); the W&B process builds W&B's
objects (``wandb.Table``, ``wandb.plot.line_series``, ``wandb.Image``) and sends them.

Every run of one experiment (the base sweep, the training run, the final evaluation, the
demo's ablations) shares one W&B group, ``logging.wandb_group`` (default: the run directory's
name), and says what it is by its ``job_type``.
"""

from __future__ import annotations

import json
import logging as std_logging
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm

from sept_megatron.config import LoggingConfig

log = std_logging.getLogger("sept_megatron")


def setup_console_logging(rank: int) -> None:
    level = std_logging.INFO if rank == 0 else std_logging.WARNING
    std_logging.basicConfig(
        level=level, format=f"[%(asctime)s r{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # Megatron logs every parameter name and its full optimizer config at INFO.
    std_logging.getLogger("megatron").setLevel(std_logging.WARNING)


def wandb_group(cfg: LoggingConfig) -> str:
    """The experiment's W&B group: ``logging.wandb_group``, else the run directory's name."""
    return cfg.wandb_group or os.path.basename(os.path.abspath(cfg.run_dir))


# What a samples table shows of each row of the round's samples JSONL, in column order.
SAMPLE_COLUMNS = (
    ("question", "prompt"),
    ("answer", "response"),
    ("response_tokens", "response_tokens"),
    ("finish_reason", "finish_reason"),
    ("tau_s", "tau_s"),
)


class RunLogger:
    """Rank 0's logger: ``metrics.jsonl``, optional W&B, per-round sample files, progress."""

    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any], *, config_file: bool = True):
        """``run_config`` (the resolved config tree) goes to W&B's config and, with
        ``config_file``, to ``run_dir/config.json`` (``eval`` keeps its own record instead)."""
        self.cfg = cfg
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
        self.samples_dir = os.path.join(cfg.run_dir, "samples")
        self._wandb: _WandbProcess | None = None
        if cfg.wandb_mode != "disabled":
            self._wandb = _WandbProcess(
                dict(
                    project=cfg.wandb_project,
                    name=cfg.run_name,
                    mode=cfg.wandb_mode,
                    dir=cfg.run_dir,
                    config=run_config,
                    group=wandb_group(cfg),
                    job_type=cfg.wandb_job_type,
                    resume="allow",
                )
            )
        if config_file:
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
                json.dump(run_config, f, indent=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"round": step, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.submit("log", dict(metrics), step)

    def rewind(self, rounds_done: int) -> None:
        """A resumed run repeats the rounds after its checkpoint: drop their records from
        ``metrics.jsonl`` (a run killed after logging a round whose checkpoint was never
        published, e.g. an async save still in flight), so every round is logged once."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("round", 0) <= rounds_done]
        with open(self.metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.metrics_path + ".tmp", self.metrics_path)

    def save_samples(self, round_index: int, rows: Iterable[dict[str, Any]]) -> None:
        """The round's samples: ``samples/round_N.jsonl`` (``logging.save_samples``) and, every
        ``logging.samples_every`` rounds, a W&B table ``rollout/samples`` at that round."""
        rows = list(rows)
        every = self.cfg.samples_every
        if self._wandb is not None and every and round_index % every == 0:
            self.log_table(
                "rollout/samples",
                [column for column, _ in SAMPLE_COLUMNS],
                [[row[field] for _, field in SAMPLE_COLUMNS] for row in rows],
                step=round_index,
            )
        if not self.cfg.save_samples:
            return
        os.makedirs(self.samples_dir, exist_ok=True)
        path = os.path.join(self.samples_dir, f"round_{round_index:06d}.jsonl")
        with open(path + ".tmp", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(path + ".tmp", path)

    # --- W&B-only panels (no-ops without W&B: their data is in the run's files) ---------------
    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        if self._wandb is not None:
            self._wandb.submit("table", key, list(columns), rows, step)

    def log_line_plot(
        self,
        key: str,
        x: list[float],
        series: dict[str, list[float | None]],
        *,
        title: str,
        x_label: str,
        step: int | None = None,
    ) -> None:
        """W&B's own line chart, one line per entry of ``series`` (values at ``x``; None
        leaves that point out: pass@32 does not exist for a greedy cell)."""
        if self._wandb is None or not series:
            return
        keys, xs, ys = list(series), [], []
        for values in series.values():
            points = [(t, v) for t, v in zip(x, values) if v is not None]
            xs.append([t for t, _ in points])
            ys.append([v for _, v in points])
        self._wandb.submit("line", key, xs, ys, keys, title, x_label, step)

    def log_image(self, key: str, path: str, caption: str | None = None, step: int | None = None) -> None:
        if self._wandb is not None:
            self._wandb.submit("image", key, os.path.abspath(path), caption, step)

    def set_summary(self, values: dict[str, Any]) -> None:
        """Run-level figures (best temperature, its AVG): one value each, not a curve."""
        if self._wandb is not None:
            self._wandb.submit("summary", dict(values))

    def progress(self, total: int, initial: int, desc: str):
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="round",
            disable=not self.cfg.progress,
            dynamic_ncols=True,
        )

    def info(self, message: str, *args) -> None:
        log.info(message, *args)

    def warning(self, message: str, *args) -> None:
        """Faults survived (a checkpoint fallback, a failed save): on the console, always."""
        log.warning(message, *args)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.close()  # everything submitted reaches W&B before the run ends
            self._wandb = None


ORPHAN_CHECK_S = 5.0
"""How often an idle W&B process checks that the training process is still there."""


class _WandbProcess:
    """W&B's SDK in a spawned process of its own, fed plain data through a queue, in order.

    Why not in the training process: measured on the tiny bench round (2 cores), W&B's Python
    side there cost 3% of a round even with its calls on a thread. Its lazy imports (telemetry
    on the first ``log``, pandas with the first ``Table``: ~250 ms of CPU) held the GIL while an
    engine generated, and the 65 MB they map made every fork of Megatron's checkpoint writers
    slower (+10 ms per save). Here the training process only pickles plain data onto a pipe.
    The price: W&B's "Logs" tab does not capture the trainer's console (the console and
    ``run_dir`` keep it). A failed call is printed and skipped: a dashboard hiccup must not end
    a training run (metrics.jsonl and the samples files have everything). A trainer killed
    without ``finish`` (SIGKILL, the OOM killer) leaves no W&B process behind: it notices
    within :data:`ORPHAN_CHECK_S`, keeps what arrived and ends the run with exit code 1.
    """

    def __init__(self, init_kwargs: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._requests = context.Queue()
        replies = context.Queue()
        self._process = context.Process(
            target=_wandb_main, args=(init_kwargs, self._requests, replies), name="sept-wandb", daemon=True
        )
        self._process.start()
        started, detail = self._wait_for_start(replies)
        if not started:
            self._process.join(timeout=30)
            raise RuntimeError(
                f"W&B did not start ({detail}); logging.wandb_mode=offline logs without a "
                "network or an API key, logging.wandb_mode=disabled turns W&B off"
            )

    def _wait_for_start(self, replies) -> tuple[bool, str]:
        """``wandb.init``'s outcome (it may take a while online)."""
        while True:
            try:
                return replies.get(timeout=1.0)
            except queue.Empty:
                if not self._process.is_alive():
                    return False, f"its process exited with code {self._process.exitcode}"

    def submit(self, kind: str, *args: Any) -> None:
        self._requests.put((kind, args))

    def close(self) -> None:
        self._requests.put(None)
        self._requests.close()
        self._process.join()


def _wandb_main(init_kwargs: dict[str, Any], requests, replies) -> None:
    """The W&B process: ``wandb.init``, then each request in order, then ``finish``."""
    import wandb

    try:
        run = wandb.init(**init_kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the training process
        replies.put((False, f"{type(exc).__name__}: {exc}"))
        return
    replies.put((True, ""))
    parent = os.getppid()
    orphaned = False
    while True:
        try:
            request = requests.get(timeout=ORPHAN_CHECK_S)
        except queue.Empty:
            # A killed trainer (SIGKILL, OOM killer) never sends the end: keep what arrived.
            if orphaned := os.getppid() != parent:
                break
            continue
        if request is None:
            break
        kind, args = request
        try:
            _WANDB_CALLS[kind](wandb, run, *args)
        except Exception as exc:  # noqa: BLE001 - see _WandbProcess
            print(
                f"sept-megatron: W&B {kind} failed ({type(exc).__name__}: {exc}); the run goes on",
                file=sys.stderr,
                flush=True,
            )
    run.finish(exit_code=1 if orphaned else 0)


def _log(wandb, run, metrics, step) -> None:
    run.log(metrics, step=step)


def _table(wandb, run, key, columns, rows, step) -> None:
    run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)


def _line(wandb, run, key, xs, ys, keys, title, x_label, step) -> None:
    run.log({key: wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname=x_label)}, step=step)


def _image(wandb, run, key, path, caption, step) -> None:
    run.log({key: wandb.Image(path, caption=caption)}, step=step)


def _summary(wandb, run, values) -> None:
    run.summary.update(values)


_WANDB_CALLS: dict[str, Callable[..., None]] = {
    "log": _log,
    "table": _table,
    "line": _line,
    "image": _image,
    "summary": _summary,
}


class NullRunLogger:
    """What every rank but 0 gets: same methods, no output."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def rewind(self, rounds_done: int) -> None:
        pass

    def save_samples(self, round_index: int, rows) -> None:
        pass

    def log_table(self, key: str, columns, rows, step: int | None = None) -> None:
        pass

    def log_line_plot(
        self, key: str, x, series, *, title: str, x_label: str, step: int | None = None
    ) -> None:
        pass

    def log_image(self, key: str, path: str, caption: str | None = None, step: int | None = None) -> None:
        pass

    def set_summary(self, values) -> None:
        pass

    def progress(self, total: int, initial: int, desc: str):
        return tqdm(total=total, initial=initial, disable=True)

    def info(self, message: str, *args) -> None:
        pass

    def warning(self, message: str, *args) -> None:
        pass

    def finish(self) -> None:
        pass


def build_logger(cfg: LoggingConfig, run_config: dict[str, Any], rank: int):
    return RunLogger(cfg, run_config) if rank == 0 else NullRunLogger()
