"""Everything a run does before its first round: check the run (config, model shapes, memory
plan, data files, checkpoints) before any process group exists, render the question bank,
build the engines, then the model.

The engines are built before Megatron allocates anything: an engine that sizes its memory
from what is free when it starts (SGLang's KV pool) must not see the trainer's allocations.
"""

from __future__ import annotations

import os

import torch

from sept_megatron.config import Config, ConfigError, validate
from sept_megatron.data import (
    Question,
    filter_by_prompt_length,
    load_questions,
    load_tokenizer,
    render_prompts,
)
from sept_megatron.loop import modes
from sept_megatron.loop.fleet import EngineFleet
from sept_megatron.plan import planner
from sept_megatron.rollout import backend_kwargs, build_engine
from sept_megatron.rollout.orchestration import DataParallelEngines
from sept_megatron.rollout.placement import build_placement, server_placement
from sept_megatron.runtime import compat, distributed
from sept_megatron.trainer import checkpoint as ckpt_io
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.integrity import CheckpointDamaged, choose_resume_checkpoint


def check_run(
    cfg: Config, world: int, hf_config: str | None = None
) -> tuple[ModelArch | None, list[Question]]:
    """Every problem that can be found before a process group exists, reported at once (one
    :class:`ConfigError`, a line each): the config tree, the model's shapes against the layout,
    every data file, any checkpoint to start from, then the memory plan. ``sept-megatron
    config`` runs exactly this too (``hf_config``: a config.json to read the model's shapes
    from instead of ``model.hf_path``)."""
    arch, questions, problems = run_problems(cfg, world, hf_config)
    if problems:
        raise ConfigError(f"invalid config at world size {world}:\n  " + "\n  ".join(problems))
    if arch is not None:
        # Last, on a config that is otherwise sound: the planner's memory check (no weights
        # loaded yet); its verdict comes with its own table.
        planner.check_fits(cfg, arch, world)
    return arch, questions


def run_problems(
    cfg: Config, world: int, hf_config: str | None = None
) -> tuple[ModelArch | None, list[Question], list[str]]:
    """:func:`check_run`'s findings without raising: (model shapes, questions, problems)."""
    problems: list[str] = []
    arch = None
    if hf_config or cfg.model.hf_path:
        try:
            arch = planner.load_arch(cfg, hf_config)
        except ConfigError as exc:
            problems.append(str(exc))
    try:
        validate(cfg, world, arch)
    except ConfigError as exc:
        problems += _lines(exc)
    questions = _check_data(cfg, problems)
    _check_checkpoints(cfg, arch, problems)
    return arch, questions, problems


def _lines(error: ConfigError) -> list[str]:
    text = str(error).removeprefix("invalid config:\n")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_data(cfg: Config, problems: list[str]) -> list[Question]:
    if not cfg.data.train_files:
        problems.append("data.train_files is empty: give one or more parquet/JSONL files")
    questions: list[Question] = []
    for field_name, paths in (
        ("data.train_files", cfg.data.train_files),
        ("eval.benchmarks", cfg.eval.benchmarks),
    ):
        for path in paths:
            if not os.path.exists(path):
                problems.append(f"{field_name}: {path!r} does not exist")
                continue
            try:
                loaded = load_questions(path)
            except ValueError as exc:
                problems.append(f"{field_name}: {exc}")
                continue
            if field_name == "data.train_files":
                try:
                    modes.check_train_questions(cfg.train.mode, loaded, path)
                except ConfigError as exc:
                    problems.append(str(exc))
                questions += loaded
    return questions


def _check_checkpoints(cfg: Config, arch, problems: list[str]) -> None:
    resume_root = os.path.join(cfg.logging.run_dir, "checkpoints")
    starts = [("model.megatron_ckpt", cfg.model.megatron_ckpt)]
    if cfg.checkpoint.resume and os.path.isdir(resume_root):
        # Sizes only here (no reading before the process group); CRC32s once resuming.
        try:
            starts.append(
                ("logging.run_dir (resuming)", choose_resume_checkpoint(resume_root, checksums=False).path)
            )
        except CheckpointDamaged as exc:
            problems.append(f"logging.run_dir={cfg.logging.run_dir!r}: {exc}")
    for field_name, path in starts:
        if not path:
            continue
        try:
            ckpt_io.check_intact(path)
            ckpt_io.check_compatible(ckpt_io.read_meta(path), arch, cfg.parallel.tensor_parallel)
        except (OSError, ValueError) as exc:
            problems.append(f"{field_name}={path!r}: {exc}")


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_bank(
    cfg: Config, questions: list[Question], tokenizer, logger
) -> tuple[list[Question], dict[int, list[int]]]:
    """All training questions, rendered once; over-long prompts dropped (and counted)."""
    # Re-index so every question has a unique position in the bank.
    questions = [
        Question(q.prompt_messages, q.question_text, q.ground_truth, q.source, i)
        for i, q in enumerate(questions)
    ]
    tokens = render_prompts(questions, tokenizer, cfg.data.chat_template)
    kept, kept_tokens, dropped = filter_by_prompt_length(questions, tokens, cfg.data.max_prompt_length)
    if not kept:
        raise ConfigError(
            f"no question fits data.max_prompt_length={cfg.data.max_prompt_length} "
            f"({dropped} dropped); raise it or check the chat template"
        )
    logger.info(
        "question bank: %d questions (%d dropped as longer than %d tokens)",
        len(kept),
        dropped,
        cfg.data.max_prompt_length,
    )
    return kept, {q.index: t for q, t in zip(kept, kept_tokens)}


def build_model(cfg: Config, arch: ModelArch, resume_from: str | None) -> mdl.MegatronModel:
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
        arch,
        tensor_parallel=tp,
        pipeline_parallel=cfg.parallel.pipeline_parallel,
        virtual_pipeline=cfg.parallel.virtual_pipeline,
        sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=mdl.resolve_dtype(cfg.model.params_dtype),
        transformer_impl=cfg.model.transformer_impl,
        fp8=cfg.model.fp8,
        fp8_format=cfg.model.fp8_format,
        padded_vocab=padded,
        attention=cfg.model.attention,
        recompute=cfg.train.recompute,
    )
    if resume_from:
        return model  # weights come with the optimizer state (RoundCheckpointer.resume)
    if cfg.model.megatron_ckpt:
        ckpt_io.load_model_weights(model.chunks, source)
        return model
    reader = HFTensorReader(cfg.model.hf_path)
    validate_hf_checkpoint(reader, arch)
    load_hf_into_model(
        model.chunks,
        reader,
        arch,
        padded_vocab=padded,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
    )
    reader.close()
    return model


def build_reference(cfg: Config, arch: ModelArch) -> mdl.MegatronModel | None:
    """GRPO's frozen initial model (``train.kl_coef`` > 0), built as the run's model is from
    ``model.hf_path`` / ``model.megatron_ckpt`` (never from a resumed checkpoint: the KL is to
    the initial policy); None when the KL is off."""
    if cfg.train.mode != "grpo" or not cfg.train.kl_coef:
        return None
    reference = build_model(cfg, arch, resume_from=None)
    for chunk in reference.chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return reference


def build_fleet(cfg: Config, rank: int, tokenizer=None, *, releases_memory: bool = True) -> EngineFleet:
    """Every rank's engine (collective: the engine groups' process groups are created here).

    Colocated: one engine per engine group of ``rollout.engine_tp`` ranks; every rank of a
    group holds the engine object (all take part in weight updates), its first rank
    generates. Disaggregated: the SGLang servers are one engine to the orchestration, driven
    by rank 0; rank 0 and each pipeline stage's leader hold a client (the leaders broadcast
    their stage's weights to the servers, :mod:`sept_megatron.weight_sync.server_broadcast`).
    """
    # Colocated with this rank's trainer: the same device unless rollout.device says otherwise;
    # the trainer's dtype there (bf16 on GPU, fp32 on CPU).
    device = cfg.rollout.device if cfg.rollout.device != "auto" else str(distributed.compute_device())
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if cfg.rollout.placement == "disaggregated":
        engine = None
        if rank == 0 or _leads_its_stage():
            engine = build_engine(
                cfg.rollout.backend,
                cfg.model.hf_path,
                **backend_kwargs(
                    cfg.rollout,
                    tokenizer=tokenizer,
                    seed=cfg.train.seed,
                    device=device,
                    dtype=dtype,
                    progress=False,
                ),
            )
        engines = DataParallelEngines(
            server_placement(cfg.rollout.timeout_minutes), engine, cfg.rollout.timeout_minutes
        )
    else:
        placement = build_placement(cfg.rollout.engine_tp, cfg.rollout.timeout_minutes)
        with compat.suspended():
            engine = build_engine(
                cfg.rollout.backend,
                cfg.model.hf_path,
                **backend_kwargs(
                    cfg.rollout,
                    tokenizer=tokenizer,
                    seed=cfg.train.seed,
                    device=device,
                    dtype=dtype,
                    progress=cfg.logging.progress and rank == 0,
                    placement=placement,
                    run_dir=cfg.logging.run_dir,
                ),
            )
        engines = DataParallelEngines(placement, engine, cfg.rollout.timeout_minutes)
    return EngineFleet(engines, cfg.rollout, releases_memory=releases_memory)


def _leads_its_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def tokenizer_of(cfg: Config):
    return load_tokenizer(cfg.model.hf_path)
