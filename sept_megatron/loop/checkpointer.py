"""Round checkpoints: when to save, what a save holds, and resuming from one.

A checkpoint after round r holds the trainer (weights, optimizer, scheduler) and what the loop
needs to go on exactly where it stopped: the round count and the question sampler's position.
Saves are published atomically by :class:`~sept_megatron.trainer.checkpoint.CheckpointSaver`
(a temporary directory renamed into place, then the ``latest`` pointer), so a job killed
mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from sept_megatron.config import CheckpointConfig
from sept_megatron.data import QuestionSampler
from sept_megatron.loop.cadence import SaveCadence
from sept_megatron.runtime import compat
from sept_megatron.trainer import checkpoint as ckpt_io
from sept_megatron.trainer.integrity import ResumeChoice, resume_checkpoint
from sept_megatron.trainer.sft import SFTTrainer, load_trainer_state, trainer_sharded_state_dict


class RoundCheckpointer:
    """Saves of one run under ``run_dir/checkpoints`` on the schedule of ``checkpoint``."""

    def __init__(
        self,
        checkpoint: CheckpointConfig,
        run_dir: str,
        *,
        tensor_parallel: int,
        pipeline_parallel: int,
        hf_path: str | None,
        rounds: int,
        warn: Callable[[str], None],
    ) -> None:
        self.cfg = checkpoint
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, "checkpoints")
        self.layout = (tensor_parallel, pipeline_parallel)
        self.hf_path = hf_path
        self.rounds = rounds
        self.warn = warn
        self.saver = ckpt_io.CheckpointSaver(
            checkpoint.async_save, checkpoint.keep_last, checkpoint.on_save_error, warn=warn
        )
        self.cadence = SaveCadence(checkpoint)
        self.resumed = ResumeChoice(None)

    def latest(self) -> str | None:
        """The newest complete checkpoint to resume from, every file's checksum verified
        (collective); a damaged newer one is passed over and reported. None: a fresh start, or
        ``checkpoint.resume=false``."""
        if self.cfg.resume:
            self.resumed = resume_checkpoint(self.root, self.warn)
        return self.resumed.path

    def health(self) -> dict[str, float]:
        """Save failures so far and the damaged checkpoints passed over at resume."""
        return {
            "checkpoint/save_failures": self.saver.failures,
            "checkpoint/fallbacks": len(self.resumed.passed_over),
        }

    def resume(self, trainer: SFTTrainer, sampler: QuestionSampler, ckpt_dir: str) -> int:
        """Trainer and sampler back as saved; returns the number of rounds already done."""
        state = ckpt_io.read_meta(ckpt_dir).train_state
        load_trainer_state(trainer, ckpt_dir, state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        return int(state["round"])

    def maybe_save(
        self, trainer: SFTTrainer, sampler: QuestionSampler, rounds_done: int, *, force: bool = False
    ) -> bool:
        """Save when the schedule (or ``force``) says so; True when a save was started."""
        self.saver.poll()  # publish a finished background save as soon as every rank is done
        if not (force or self.cadence.due(rounds_done, self.rounds)):
            return False
        self.cadence.started()
        model = trainer.model
        meta = ckpt_io.CheckpointMeta(
            model.arch,
            model.padded_vocab,
            ckpt_io.torch_dtype_name(model.config.params_dtype),
            *self.layout,
            train_state={
                "round": rounds_done,
                "sampler": sampler.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
            },
        )
        os.makedirs(self.root, exist_ok=True)
        self.saver.save(
            self.root, f"round_{rounds_done:06d}", trainer_sharded_state_dict(trainer), meta, self.hf_path
        )
        return True

    def finish(self) -> None:
        """Publish the save in flight (renamed, pointer written) before anything reads it."""
        self.saver.finish()

    def export_final(self, rank: int) -> None:
        """Rank 0 writes an HF checkpoint of the final model to ``run_dir/hf_final``."""
        if not (self.cfg.export_hf and rank == 0 and ckpt_io.latest_checkpoint(self.root)):
            return
        from sept_megatron.convert import export_megatron_to_hf

        with compat.suspended():
            export_megatron_to_hf(self.root, os.path.join(self.run_dir, "hf_final"), progress=False)
