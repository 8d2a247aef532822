"""The SePT loop: sample questions, let the current model answer at tau_s, SFT on the answers,
refresh the rollout engine with the new weights, repeat.

    torchrun --nproc-per-node=N -m sept_megatron.cli train --config X.yaml [key=value ...]

Every rank runs :func:`run`. The round's questions are spread over every engine and the answers
come back to every rank in order (:mod:`sept_megatron.rollout.orchestration`), each
data-parallel rank trains on its share, and :mod:`sept_megatron.weight_sync` moves the updated
weights into every engine. Where things live: the schedule and the modes
(:mod:`~sept_megatron.loop.schedule`), one round's data (:mod:`~sept_megatron.loop.round`), the
engines' memory and sync (:mod:`~sept_megatron.loop.fleet`), checkpoints
(:mod:`~sept_megatron.loop.checkpointer`), set-up (:mod:`~sept_megatron.loop.startup`).
"""

from __future__ import annotations

import time

from sept_megatron.config import Config
from sept_megatron.data import QuestionSampler
from sept_megatron.logging import build_logger, setup_console_logging
from sept_megatron.loop import startup
from sept_megatron.loop.checkpointer import RoundCheckpointer
from sept_megatron.loop.round import Timer, answer_once, fit, generate_round, round_metrics
from sept_megatron.loop.schedule import (
    Schedule,
    offline_settings,
    offline_temperature,
    round_seed,
    total_rounds,
)
from sept_megatron.loop.telemetry import RoundTelemetry
from sept_megatron.loop.validation import validate_round
from sept_megatron.rollout.registry import backend_class
from sept_megatron.runtime import distributed, preemption
from sept_megatron.trainer.offload import offloaded
from sept_megatron.trainer.sft import SFTTrainer


def run(cfg: Config) -> dict[str, float]:
    """Run SePT rounds end to end; returns the last round's metrics."""
    cfg = offline_settings(cfg)  # the offline ablation's own SFT settings, when asked for
    arch, questions = startup.check_run(cfg, distributed.world_size_from_env())
    backend_class(cfg.rollout.backend).prepare_process(cfg.rollout)  # before any communicator
    env = distributed.initialize(
        tensor_parallel=cfg.parallel.tensor_parallel,
        pipeline_parallel=cfg.parallel.pipeline_parallel,
        virtual_pipeline=cfg.parallel.virtual_pipeline,
        seed=cfg.train.seed,
        backend=cfg.parallel.backend,
        device=cfg.parallel.device,
        timeout_minutes=cfg.parallel.timeout_minutes,
    )
    setup_console_logging(env.rank)
    logger = build_logger(cfg.logging, cfg.to_dict(), env.rank)
    try:
        return _run(cfg, arch, questions, env.rank, logger)
    finally:
        logger.finish()
        distributed.shutdown()


def _run(cfg: Config, arch, questions, rank: int, logger) -> dict[str, float]:
    tokenizer = startup.tokenizer_of(cfg)
    bank, prompt_ids = startup.load_bank(cfg, questions, tokenizer, logger)
    schedule = Schedule(cfg.train, cfg.rollout, total_rounds(cfg.train, len(bank)))
    sampler = QuestionSampler(bank, seed=cfg.data.shuffle_seed)
    checkpoints = RoundCheckpointer(
        cfg.checkpoint,
        cfg.logging.run_dir,
        tensor_parallel=cfg.parallel.tensor_parallel,
        pipeline_parallel=cfg.parallel.pipeline_parallel,
        hf_path=cfg.model.hf_path,
        rounds=schedule.rounds,
        warn=logger.warning,
    )
    fleet = startup.build_fleet(cfg, rank, tokenizer, releases_memory=schedule.refreshes_engine)
    resume_from = checkpoints.latest()
    model = startup.build_model(cfg, arch, resume_from)
    trainer = SFTTrainer(
        model,
        cfg.train,
        total_steps=schedule.rounds * schedule.steps_per_round,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        pad_id=startup.pad_id(tokenizer),
        total_rounds=schedule.rounds,
    )
    reference = startup.build_reference(cfg, arch)  # GRPO's KL to the initial model, when on
    start = checkpoints.resume(trainer, sampler, resume_from) if resume_from else 0
    if resume_from:
        logger.info("resumed from %s at round %d", resume_from, start)
        logger.rewind(start)  # the rounds after the checkpoint are run (and logged) again
    # The engines start from model.hf_path; sync first when the trainer's weights differ
    # (resumed, Megatron checkpoint) or the engine holds none yet (FP8: started with dummy
    # weights from an FP8 config, see rollout.sglang_engine.prepare_fp8_model_dir).
    if start > 0 or cfg.model.megatron_ckpt or cfg.rollout.weights == "fp8":
        fleet.sync(model)
    answered = (
        answer_once(cfg, fleet, bank, prompt_ids, offline_temperature(cfg)) if schedule.answers_once else None
    )
    if cfg.eval.before_training and start == 0:  # the base model's figures, at step 0
        logger.log(validate_round(cfg, fleet, tokenizer, -1, force=True), step=0)

    telemetry = RoundTelemetry.for_run(  # TFLOP/s, MFU and memory peaks per round
        arch,
        world_size=distributed.world_size_from_env(),
        device=distributed.compute_device(),
        peak_tflops=cfg.logging.peak_tflops,
        measure_round_fit=cfg.train.measure_round_fit,
    )
    stop = preemption.install()
    metrics: dict[str, float] = {}
    bar = logger.progress(schedule.rounds, start, "SePT rounds")
    for round_index in range(start, schedule.rounds):
        round_start, timer, memory = time.perf_counter(), Timer(), {}
        tau_s = schedule.tau_sample(round_index)
        # 1. Sample questions; the current model answers them at tau_s.
        with (
            timer("generate"),
            telemetry.phase(memory, "generate"),
            offloaded(trainer, cfg.train.offload_during_rollout),
        ):
            batch = generate_round(
                cfg,
                fleet,
                sampler.next_batch(cfg.train.prompts_per_round),
                prompt_ids,
                tau_s,
                round_seed(cfg.train.seed, round_index),
                answered,
            )
            fleet.release()  # colocated: the engine's memory goes to Megatron's steps
        # 2. Plain SFT on those answers, one optimizer step per mini-batch.
        with timer("train"), telemetry.phase(memory, "train"):
            step_logs = fit(trainer, batch, cfg.train, round_index + 1, reference)
        # 3. Online refresh: the next round is generated by the updated model.
        with timer("sync"), telemetry.phase(memory, "sync"):
            fleet.sync(model, refresh=schedule.refreshes_engine)
        metrics = round_metrics(step_logs, batch, timer.seconds, tau_s, round_index, schedule.rounds)
        metrics |= telemetry.throughput(batch.samples, timer.seconds["train"]) | memory
        metrics |= validate_round(cfg, fleet, tokenizer, round_index)
        with timer("checkpoint"):
            saved = checkpoints.maybe_save(trainer, sampler, round_index + 1)
        metrics["timing/checkpoint"] = timer.seconds["checkpoint"]
        metrics |= checkpoints.health()
        logger.save_samples(round_index + 1, batch.rows)
        # The whole round up to its log record: what generate/train/sync/checkpoint leave out
        # (payload, metrics, samples file) is the loop's own overhead.
        metrics["timing/round"] = time.perf_counter() - round_start
        logger.log(metrics, step=round_index + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tau=f"{tau_s:.2f}")
        # Preemption (SIGUSR1 before the time limit, see runtime/preemption.py): all ranks
        # agree, this round gets its checkpoint, and the requeued job resumes after it.
        if round_index + 1 < schedule.rounds and stop.agreed():
            if not saved:
                checkpoints.maybe_save(trainer, sampler, round_index + 1, force=True)
            checkpoints.finish()  # published before the job may end
            bar.close()
            raise preemption.Preempted(round_index + 1)
    bar.close()
    checkpoints.finish()  # the last checkpoint is published before anything reads it
    checkpoints.export_final(rank)
    return metrics
