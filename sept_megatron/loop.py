"""The SePT loop: sample questions, let the current model answer at tau_s, SFT on the answers,
refresh the rollout engine with the new weights, repeat.

    torchrun --nproc-per-node=N -m sept_megatron.cli train --config X.yaml [key=value ...]

Every rank runs :func:`run`. Every rank also hosts a rollout engine (colocated; engine groups
of ``rollout.engine_tp`` ranks, see :mod:`sept_megatron.rollout.placement`): the round's
questions are spread over all engines and the answers come back to every rank in order
(:mod:`sept_megatron.rollout.orchestration`), each data-parallel rank trains on its share, and
the resharder streams the updated weights into every engine. Modes (``train.mode``): ``online``
(SePT), ``offline`` (the base model answers the whole bank once, then only training),
``coupled`` (tau_s = tau_t, the paper's zero-expected-gradient control), and the paper's
baselines ``em`` and ``grpo`` (:mod:`sept_megatron.modes`).
"""

from __future__ import annotations

import math
import os
import time
from array import array
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sept_megatron import checkpoint as ckpt_io
from sept_megatron import compat, distributed, modes, plan, preemption
from sept_megatron import model as mdl
from sept_megatron.config import Config, RolloutConfig, ConfigError, validate
from sept_megatron.data import Question, QuestionSampler, filter_by_prompt_length, load_questions, render_prompts
from sept_megatron.logging import build_logger, setup_console_logging
from sept_megatron.reshard import sync_weights
from sept_megatron.rollout import SamplingParams, backend_kwargs, build_engine
from sept_megatron.rollout.orchestration import DataParallelEngines
from sept_megatron.rollout.placement import build_placement, server_placement
from sept_megatron.train import SFTTrainer, Sample, load_trainer_state, trainer_sharded_state_dict


# --- the schedule -----------------------------------------------------------------------
def sampling_temperature(rollout: RolloutConfig, progress: float) -> float:
    """tau_s at a fraction ``progress`` of training: from tau_start to tau_end over the first
    ``anneal_fraction`` of rounds, tau_end afterwards (paper: 0.6 -> 1.0 over 2 of 3 epochs)."""
    if rollout.anneal == "constant":
        return rollout.tau_start
    x = min(1.0, max(0.0, progress / rollout.anneal_fraction))
    if rollout.anneal == "cosine":
        x = (1 - math.cos(math.pi * x)) / 2
    return rollout.tau_start + (rollout.tau_end - rollout.tau_start) * x


def total_rounds(cfg: Config, bank_size: int) -> int:
    if cfg.train.rounds is not None:
        return cfg.train.rounds
    return max(1, math.ceil(cfg.train.epochs * bank_size / cfg.train.prompts_per_round))


@dataclass
class RoundBatch:
    """What one round trains on, identical on every rank after the broadcast."""

    questions: list[Question]
    samples: list[Sample]
    rows: list[dict]  # for the samples JSONL
    stats: dict[str, float]


# --- the loop ----------------------------------------------------------------------------
def run(cfg: Config) -> dict[str, float]:
    """Run SePT rounds end to end; returns the last round's metrics."""
    arch, questions = check_config(cfg)
    env = distributed.initialize(
        tensor_parallel=cfg.parallel.tensor_parallel, pipeline_parallel=cfg.parallel.pipeline_parallel,
        virtual_pipeline=cfg.parallel.virtual_pipeline, seed=cfg.train.seed, backend=cfg.parallel.backend,
        device=cfg.parallel.device, timeout_minutes=cfg.parallel.timeout_minutes)
    setup_console_logging(env.rank)
    logger = build_logger(cfg.logging, cfg.to_dict(), env.rank)
    try:
        return _run(cfg, arch, questions, env, logger)
    finally:
        logger.finish()
        distributed.shutdown()


def _run(cfg: Config, arch: mdl.ModelArch, questions: list[Question], env,
         logger) -> dict[str, float]:
    tokenizer = _load_tokenizer(cfg.model.hf_path)
    bank, prompt_ids = load_bank(cfg, questions, tokenizer, logger)
    rounds = total_rounds(cfg, len(bank))
    steps_per_round = cfg.train.prompts_per_round * cfg.rollout.n // cfg.train.mini_batch_size
    sampler = QuestionSampler(bank, seed=cfg.data.shuffle_seed)
    ckpt_root = os.path.join(cfg.logging.run_dir, "checkpoints")
    resume_from = ckpt_io.latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    saver = ckpt_io.CheckpointSaver(cfg.checkpoint.async_save, cfg.checkpoint.keep_last)

    model = build_model(cfg, arch, resume_from)
    trainer = SFTTrainer(model, cfg.train, total_steps=rounds * steps_per_round,
                         use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                         pad_id=_pad_id(tokenizer))
    start = 0
    if resume_from:
        start = _resume(trainer, sampler, resume_from)
        logger.info("resumed from %s at round %d", resume_from, start)
    engines = build_engines(cfg, env.rank, tokenizer)
    engine = engines.local  # this rank's engine: every rank syncs weights into its own
    # The engines start from model.hf_path; sync first when the trainer's weights differ
    # (resumed, Megatron checkpoint) or the engine holds none yet (FP8: started with dummy
    # weights from an FP8 config, see rollout.sglang_engine.prepare_fp8_model_dir).
    if start > 0 or cfg.model.megatron_ckpt or cfg.rollout.weights == "fp8":
        sync_rollout_weights(cfg.rollout, model, engine)
    offline_answers = _offline_answers(cfg, engines, bank, prompt_ids) \
        if cfg.train.mode == "offline" else None

    stop = preemption.install()
    metrics: dict[str, float] = {}
    bar = logger.progress(rounds, start, "SePT rounds")
    for round_index in range(start, rounds):
        round_start = time.perf_counter()
        timings = {}
        # 1. Sample questions; the current model answers them at tau_s.
        tau_s = _tau_for_round(cfg, round_index, rounds)
        questions = sampler.next_batch(cfg.train.prompts_per_round)
        with _timer(timings, "generate"):
            batch = generate_round(cfg, engines, questions, prompt_ids, tau_s, round_index,
                                   offline_answers)
            batch = modes.prepare_round(cfg.train.mode, batch, cfg.rollout.n)  # GRPO: rewards
            if engine is not None and cfg.rollout.placement == "colocated":
                engine.release_memory()  # the engine's GPU memory goes to Megatron's steps
        # 2. Plain SFT on those answers, one optimizer step per mini-batch.
        with _timer(timings, "train"):
            fit_before = trainer.evaluate_loss(batch.samples) if cfg.train.measure_round_fit else None
            step_logs, mode_stats = modes.train_round(
                trainer, mini_batches(batch.samples, cfg.train), cfg.train.mode)
            batch.stats |= mode_stats
            if fit_before is not None:
                batch.stats |= {"train/round_fit_before": fit_before,
                                "train/round_fit_after": trainer.evaluate_loss(batch.samples)}
        # 3. Online refresh: the next round is generated by the updated model.
        with _timer(timings, "sync"):
            if cfg.train.mode != "offline":
                sync_rollout_weights(cfg.rollout, model, engine)  # weights back, then loaded
            if engine is not None and cfg.rollout.placement == "colocated":
                engine.resume_memory()  # ...then the KV cache (CUDA graphs), after the sync
        metrics = round_metrics(step_logs, batch, timings, tau_s, round_index, rounds)
        metrics |= _maybe_validate(cfg, engines, tokenizer, round_index)
        with _timer(timings, "checkpoint"):
            saved = _maybe_checkpoint(cfg, trainer, sampler, round_index + 1, rounds, ckpt_root,
                                      arch, saver)
        metrics["timing/checkpoint"] = timings["checkpoint"]
        logger.save_samples(round_index + 1, batch.rows)
        # The whole round up to its log record: what generate/train/sync/checkpoint leave out
        # (payload, metrics, samples file) is the loop's own overhead.
        metrics["timing/round"] = time.perf_counter() - round_start
        logger.log(metrics, step=round_index + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tau=f"{tau_s:.2f}")
        # Preemption (SIGUSR1 before the time limit, see preemption.py): all ranks agree, this
        # round gets its checkpoint, and the requeued job resumes after it.
        if round_index + 1 < rounds and stop.agreed():
            if not saved:
                _maybe_checkpoint(cfg, trainer, sampler, round_index + 1, rounds, ckpt_root, arch,
                                  saver, force=True)
            saver.finish()  # published (renamed, pointer written) before the job may end
            bar.close()
            raise preemption.Preempted(round_index + 1)
    bar.close()
    saver.finish()  # the last checkpoint is published before anything reads it
    if cfg.checkpoint.export_hf and env.rank == 0 and ckpt_io.latest_checkpoint(ckpt_root):
        _export_final(ckpt_root, cfg.logging.run_dir)
    return metrics


# --- set-up ------------------------------------------------------------------------------
def check_config(cfg: Config) -> tuple[mdl.ModelArch, list[Question]]:
    """Everything that can be checked before a process group exists: the config tree, the
    model's shapes against the layout, every data file, and any checkpoint to start from."""
    world = distributed.world_size_from_env()
    arch = None
    if cfg.model.hf_path:
        try:
            arch = mdl.arch_from_hf_config(mdl.load_hf_config(cfg.model.hf_path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.hf_path={cfg.model.hf_path!r}: {exc}") from None
    validate(cfg, world, arch)
    if arch is not None:
        plan.check_fits(cfg, arch, world)  # the planner's memory check; no weights loaded yet
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give one or more parquet/JSONL files")
    questions: list[Question] = []
    for field_name, paths in (("data.train_files", cfg.data.train_files),
                              ("eval.benchmarks", cfg.eval.benchmarks)):
        for path in paths:
            if not os.path.exists(path):
                raise ConfigError(f"{field_name}: {path!r} does not exist")
            try:
                loaded = load_questions(path)
            except ValueError as exc:
                raise ConfigError(f"{field_name}: {exc}") from None
            if field_name == "data.train_files":
                modes.check_train_questions(cfg.train.mode, loaded, path)
                questions += loaded
    resume_root = os.path.join(cfg.logging.run_dir, "checkpoints")
    starts = [("model.megatron_ckpt", cfg.model.megatron_ckpt)]
    if cfg.checkpoint.resume and ckpt_io.latest_checkpoint(resume_root):
        starts.append(("logging.run_dir (resuming)", resume_root))
    for field_name, path in starts:
        if not path:
            continue
        try:
            ckpt_io.check_compatible(ckpt_io.read_meta(path), arch, cfg.parallel.tensor_parallel)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{field_name}={path!r}: {exc}") from None
    return arch, questions


def _load_tokenizer(hf_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_path, local_files_only=True)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_bank(cfg: Config, questions: list[Question], tokenizer,
              logger) -> tuple[list[Question], dict[int, list[int]]]:
    """All training questions, rendered once; over-long prompts dropped (and counted)."""
    # Re-index so every question has a unique position in the bank.
    questions = [Question(q.prompt_messages, q.question_text, q.ground_truth, q.source, i)
                 for i, q in enumerate(questions)]
    tokens = render_prompts(questions, tokenizer, cfg.data.chat_template)
    kept, kept_tokens, dropped = filter_by_prompt_length(questions, tokens, cfg.data.max_prompt_length)
    if not kept:
        raise ConfigError(f"no question fits data.max_prompt_length={cfg.data.max_prompt_length} "
                          f"({dropped} dropped); raise it or check the chat template")
    logger.info("question bank: %d questions (%d dropped as longer than %d tokens)", len(kept),
                dropped, cfg.data.max_prompt_length)
    return kept, {q.index: t for q, t in zip(kept, kept_tokens)}


def build_model(cfg: Config, arch: mdl.ModelArch, resume_from: str | None) -> mdl.MegatronModel:
    """This rank's stages, with weights from HF (fresh start) or a Megatron checkpoint."""
    from megatron.core import parallel_state as ps

    from sept_megatron.convert import HFTensorReader, load_hf_into_model, validate_hf_checkpoint

    tp = cfg.parallel.tensor_parallel
    source = resume_from or cfg.model.megatron_ckpt
    if source:
        meta = ckpt_io.read_meta(source)
        ckpt_io.check_compatible(meta, arch, tp)
        padded = meta.padded_vocab
    else:
        padded = mdl.padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    model = mdl.build_megatron_model(
        arch, tensor_parallel=tp, pipeline_parallel=cfg.parallel.pipeline_parallel,
        virtual_pipeline=cfg.parallel.virtual_pipeline, sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=mdl.resolve_dtype(cfg.model.params_dtype),
        transformer_impl=cfg.model.transformer_impl, fp8=cfg.model.fp8,
        fp8_format=cfg.model.fp8_format, padded_vocab=padded, attention=cfg.model.attention,
        recompute=cfg.train.recompute)
    if resume_from:
        return model  # weights come with the optimizer state in _resume
    if cfg.model.megatron_ckpt:
        ckpt_io.load_model_weights(model.chunks, source)
        return model
    reader = HFTensorReader(cfg.model.hf_path)
    validate_hf_checkpoint(reader, arch)
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded,
                       tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp)
    reader.close()
    return model


def build_engines(cfg: Config, rank: int, tokenizer=None) -> DataParallelEngines:
    """Every rank's engine (collective: the engine groups' process groups are created here).

    Colocated: one engine per engine group of ``rollout.engine_tp`` ranks; every rank of a
    group holds the engine object (all take part in weight updates), its first rank
    generates. Disaggregated: the SGLang servers are one engine to the orchestration, driven
    by rank 0; rank 0 and each pipeline stage's leader hold a client (the leaders broadcast
    their stage's weights to the servers, see :func:`sync_rollout_weights`).
    """
    # Colocated with this rank's trainer: the same device unless rollout.device says otherwise.
    device = cfg.rollout.device if cfg.rollout.device != "auto" else str(distributed.compute_device())
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if cfg.rollout.placement == "disaggregated":
        engine = None
        if rank == 0 or _leads_its_stage():
            engine = build_engine(cfg.rollout.backend, cfg.model.hf_path, **backend_kwargs(
                cfg.rollout, tokenizer=tokenizer, seed=cfg.train.seed, device=device,
                dtype=dtype, progress=False))
        return DataParallelEngines(server_placement(), engine)
    placement = build_placement(cfg.rollout.engine_tp)
    with compat.suspended():
        engine = build_engine(cfg.rollout.backend, cfg.model.hf_path, **backend_kwargs(
            cfg.rollout, tokenizer=tokenizer, seed=cfg.train.seed, device=device, dtype=dtype,
            progress=cfg.logging.progress and rank == 0, placement=placement))
    return DataParallelEngines(placement, engine)


def _leads_its_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def sync_rollout_weights(rollout, model, engine) -> int:
    """The trainer's weights into the rollout engines (collective over every rank); the one
    place the sync path follows ``rollout.placement``. Colocated: every rank assembles the
    full buckets and loads them into its own engine (an SGLang engine group loads through its
    owner, :meth:`~sept_megatron.rollout.sglang_engine.SGLangRolloutEngine.update_weights`).
    Disaggregated: each stage leader broadcasts its stage to the servers, one stage at a time."""
    bucket_bytes = rollout.bucket_size_mb << 20
    if rollout.placement == "disaggregated":
        from sept_megatron.rollout.sglang_remote import sync_weights_to_servers

        return sync_weights_to_servers(model, engine, bucket_bytes, weights=rollout.weights)
    return sync_weights(model, engine, bucket_bytes, weights=rollout.weights)


def _resume(trainer: SFTTrainer, sampler: QuestionSampler, ckpt_dir: str) -> int:
    state = ckpt_io.read_meta(ckpt_dir).train_state
    load_trainer_state(trainer, ckpt_dir, state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    return int(state["round"])


# --- one round -----------------------------------------------------------------------------
def _tau_for_round(cfg: Config, round_index: int, rounds: int) -> float:
    if cfg.train.mode in modes.SAMPLE_AT_TRAIN_TEMPERATURE:
        return cfg.train.tau_train
    return sampling_temperature(cfg.rollout, round_index / rounds)


def round_seed(seed: int, round_index: int) -> int:
    return seed * 100_003 + round_index


def generate_round(cfg: Config, engines: DataParallelEngines, questions: list[Question],
                   prompt_ids: dict[int, list[int]], tau_s: float, round_index: int,
                   offline_answers=None) -> RoundBatch:
    """Every engine answers its share (or offline answers are looked up); every rank ends with
    the same batch, in question order."""
    start = time.perf_counter()
    if offline_answers is not None:
        generations = [offline_answers[q.index] for q in questions]
    else:
        sampling = _rollout_sampling(cfg, tau_s, round_seed(cfg.train.seed, round_index))
        with compat.suspended():
            generations = engines.generate([prompt_ids[q.index] for q in questions], sampling)
    return _round_payload(cfg, questions, prompt_ids, generations, tau_s,
                          time.perf_counter() - start)


def _rollout_sampling(cfg: Config, tau_s: float, seed: int) -> SamplingParams:
    return SamplingParams(temperature=tau_s, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                          n=cfg.rollout.n, max_new_tokens=cfg.data.max_response_length, seed=seed)


def _round_payload(cfg, questions, prompt_ids, generations, tau_s, seconds) -> RoundBatch:
    samples, rows, lengths, truncated = [], [], [], 0
    for q, gens in zip(questions, generations):
        for g in gens:
            is_truncated = g.finish_reason != "stop"
            truncated += is_truncated
            lengths.append(len(g.token_ids))
            rows.append({"index": q.index, "prompt": q.question_text, "response": g.text,
                         "tau_s": tau_s, "prompt_tokens": len(prompt_ids[q.index]),
                         "response_tokens": len(g.token_ids), "finish_reason": g.finish_reason})
            if is_truncated and cfg.train.drop_truncated:
                continue
            samples.append(Sample(prompt_ids[q.index], list(g.token_ids)))
    if len(samples) < cfg.train.mini_batch_size:
        raise RuntimeError(f"only {len(samples)} answers left after dropping truncated ones; "
                           "set train.drop_truncated=false or raise data.max_response_length")
    stats = {"rollout/response_length_mean": sum(lengths) / len(lengths),
             "rollout/response_length_max": float(max(lengths)),
             "rollout/truncation_rate": truncated / len(lengths),
             "perf/gen_tokens_per_s": sum(lengths) / max(seconds, 1e-9)}
    return RoundBatch(questions, samples, rows, stats)


def mini_batches(samples: list[Sample], train_cfg) -> list[list[Sample]]:
    """Consecutive mini-batches of ``mini_batch_size``; a short tail (dropped answers) is cut."""
    size = train_cfg.mini_batch_size
    return [samples[i: i + size] for i in range(0, len(samples) - size + 1, size)]


def round_metrics(step_logs, batch: RoundBatch, timings, tau_s, round_index, rounds) -> dict:
    tokens = sum(s["train/response_tokens"] for s in step_logs)
    metrics = {
        "train/loss": sum(s["train/loss"] for s in step_logs) / len(step_logs),
        "train/loss_first_step": step_logs[0]["train/loss"],
        "train/loss_last_step": step_logs[-1]["train/loss"],
        "train/grad_norm": sum(s["train/grad_norm"] for s in step_logs) / len(step_logs),
        "train/lr": step_logs[-1]["train/lr"],
        "train/optimizer_steps": len(step_logs),
        "rollout/tau_s": tau_s,
        "perf/train_tokens_per_s": tokens / max(timings["train"], 1e-9),
        "progress/round": round_index + 1, "progress/rounds": rounds,
    }
    metrics |= batch.stats
    metrics |= {f"timing/{k}": v for k, v in timings.items()}
    return metrics


class _timer:
    def __init__(self, sink: dict, name: str):
        self.sink, self.name = sink, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.sink[self.name] = time.perf_counter() - self.start


# --- offline mode, validation, checkpoints ------------------------------------------------
def _offline_answers(cfg: Config, engines: DataParallelEngines, bank, prompt_ids):
    """The base model answers the whole bank once, at tau_start, spread over every engine.
    Every rank keeps all answers, token ids packed as int32 (a Python list costs ~9x more)."""
    sampling = _rollout_sampling(cfg, cfg.rollout.tau_start, cfg.train.seed)
    with compat.suspended():
        generations = engines.generate([prompt_ids[q.index] for q in bank], sampling)
    for row in generations:
        for generation in row:
            generation.token_ids = array("i", generation.token_ids)
    return {q.index: g for q, g in zip(bank, generations)}


def _maybe_validate(cfg: Config, engines: DataParallelEngines, tokenizer,
                    round_index: int) -> dict[str, float]:
    """Every engine answers its share of the validation questions; rank 0 grades."""
    every = cfg.eval.every_n_rounds
    if not every or not cfg.eval.benchmarks or (round_index + 1) % every:
        return {}
    from sept_megatron.eval.sweep import evaluate_once

    benchmarks: dict[str, list[Question]] = {}
    for path in cfg.eval.benchmarks:
        for q in load_questions(path):
            benchmarks.setdefault(q.source, []).append(q)
    with compat.suspended():
        metrics = evaluate_once(
            engines, tokenizer, benchmarks, temperature=cfg.eval.temperature, n=cfg.eval.n,
            max_questions=cfg.eval.max_questions, template=cfg.data.chat_template,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.data.max_response_length,
            seed=cfg.train.seed)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _maybe_checkpoint(cfg: Config, trainer: SFTTrainer, sampler, rounds_done: int,
                      rounds: int, ckpt_root: str, arch, saver: ckpt_io.CheckpointSaver,
                      force: bool = False) -> bool:
    """Checkpoint when the schedule (or ``force``) says so; True when one was started."""
    saver.poll()  # publish a finished background save as soon as every rank is done
    every = cfg.checkpoint.save_every_n_rounds
    if not force and rounds_done != rounds and (not every or rounds_done % every):
        return False
    meta = ckpt_io.CheckpointMeta(
        arch, trainer.model.padded_vocab, ckpt_io.torch_dtype_name(trainer.model.config.params_dtype),
        cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
        train_state={"round": rounds_done, "sampler": sampler.state_dict(),
                     "scheduler": trainer.scheduler.state_dict()})
    os.makedirs(ckpt_root, exist_ok=True)
    saver.save(ckpt_root, f"round_{rounds_done:06d}", trainer_sharded_state_dict(trainer), meta,
               cfg.model.hf_path)
    return True


def _export_final(ckpt_root: str, run_dir: str) -> None:
    from sept_megatron.convert import export_megatron_to_hf

    with compat.suspended():
        export_megatron_to_hf(ckpt_root, os.path.join(run_dir, "hf_final"), progress=False)
