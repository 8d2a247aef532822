"""One run logger: metrics to JSONL and W&B, samples to JSONL, progress bars; rank 0 only.

Non-zero ranks get :class:`NullRunLogger` (nanoGPT's trick): code calls ``logger.log(...)``
everywhere without ``if rank == 0``. Nothing secret is ever logged: the config holds no
credentials, and W&B reads its key from its own environment/netrc.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import time
from typing import Any, Iterable

from tqdm import tqdm

from sept_megatron.config import LoggingConfig

log = std_logging.getLogger("sept_megatron")


def setup_console_logging(rank: int) -> None:
    level = std_logging.INFO if rank == 0 else std_logging.WARNING
    std_logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    # Megatron logs every parameter name and its full optimizer config at INFO.
    std_logging.getLogger("megatron").setLevel(std_logging.WARNING)


class RunLogger:
    """Rank 0's logger: ``metrics.jsonl``, optional W&B, per-round sample files, progress."""

    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any]):
        self.cfg = cfg
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
        self.samples_dir = os.path.join(cfg.run_dir, "samples")
        self._wandb = None
        if cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name,
                                     mode=cfg.wandb_mode, dir=cfg.run_dir, config=run_config,
                                     resume="allow")
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"round": step, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def save_samples(self, round_index: int, rows: Iterable[dict[str, Any]]) -> None:
        if not self.cfg.save_samples:
            return
        os.makedirs(self.samples_dir, exist_ok=True)
        path = os.path.join(self.samples_dir, f"round_{round_index:06d}.jsonl")
        with open(path + ".tmp", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(path + ".tmp", path)

    def progress(self, total: int, initial: int, desc: str):
        return tqdm(total=total, initial=initial, desc=desc, unit="round",
                    disable=not self.cfg.progress, dynamic_ncols=True)

    def info(self, message: str, *args) -> None:
        log.info(message, *args)

    def warning(self, message: str, *args) -> None:
        """Faults survived (a checkpoint fallback, a failed save): on the console, always."""
        log.warning(message, *args)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


class NullRunLogger:
    """What every rank but 0 gets: same methods, no output."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def save_samples(self, round_index: int, rows) -> None:
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
