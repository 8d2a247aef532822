"""One typed config tree: YAML in, ``key=value`` overrides, validated once before any worker.

    cfg = load_config("examples/qwen2.5-math-7b.yaml", ["train.lr=2e-7", "parallel.tensor_parallel=4"])
    validate(cfg, world_size=8)

Each component receives only its own section (``cfg.rollout``, ``cfg.train``, ...). Every
validation error names the field, the bad value and the fix, and all errors are reported at
once, before a process group, a model or a GPU is touched.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(kw_only=True)
class ModelConfig:
    hf_path: str | None = None
    """HF checkpoint dir: architecture, tokenizer, and the initial weights (unless megatron_ckpt)."""
    megatron_ckpt: str | None = None
    """A checkpoint from tools/convert_hf_to_megatron.py to start from instead of hf_path's weights."""
    params_dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""
    transformer_impl: str = "auto"
    """auto (TE when importable and on CUDA), transformer_engine, local."""
    attention: str = "sdpa"
    """Core attention of the local layers (TE brings its own fused attention): sdpa
    (torch.nn.functional.scaled_dot_product_attention: flash/cuDNN kernels on GPU, GQA without
    repeated K/V, no [b * heads, s, s] scores kept) or unfused (Megatron's DotProductAttention,
    which materialises fp32 scores: the reference, and what the 0.16 local spec ships)."""
    fp8: str | None = None
    """FP8 recipe through TE: null, delayed, tensorwise, blockwise."""
    fp8_format: str = "hybrid"
    """FP8 formats with model.fp8: hybrid (e4m3 forward, e5m2 gradients) or e4m3 throughout."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding / LM-head rows to a multiple of this (x TP), as Megatron does."""


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """Megatron tensor-parallel size; must divide the head and query-group counts and the FFN
    size."""
    pipeline_parallel: int = 1
    """Megatron pipeline stages; the world size must be a multiple of tensor_parallel x
    pipeline_parallel."""
    virtual_pipeline: int | None = None
    """Interleaved (virtual) stages per pipeline rank: null, or >= 2 with pipeline_parallel >= 2."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism of norms and dropout; needs tensor_parallel > 1."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (only matters when DP > 1)."""
    backend: str = "auto"
    """auto (nccl on GPU, gloo on CPU), nccl, gloo."""
    device: str = "auto"
    """Where the trainer computes: auto (cuda when a GPU is visible, else cpu), cuda, cpu.
    ``cpu`` runs megatron-core through the CPU compatibility layer over gloo, also on a GPU
    machine. The environment variable SEPT_DEVICE, when set, overrides ``auto``."""
    gpu_mem_gb: float | None = None
    """Memory per GPU (GiB) the layout must fit: ``train`` runs the planner (``sept-megatron
    plan``) before loading weights and refuses a layout that cannot fit. null: the CUDA
    device's own memory; on CPU, null skips the check (there is no GPU memory to compare)."""
    timeout_minutes: float = 30.0
    """Collective timeout of every process group: a rank waiting on a dead or hung peer fails
    after this long instead of hanging. Must exceed the longest wait of one rank on another
    (generation on the engine rank, checkpoint save, the final HF export on rank 0)."""


@dataclass(kw_only=True)
class RolloutConfig:
    backend: str = "hf"
    """hf (transformers generate; CPU or one GPU) or sglang."""
    placement: str = "colocated"
    """colocated (every trainer GPU also hosts a rollout engine rank; engine memory is
    released while Megatron trains) or disaggregated (SGLang servers on their own GPUs/nodes,
    addresses in ``server_urls``)."""
    engine_tp: int = 1
    """GPUs per rollout engine (the engine's own tensor parallelism, independent of Megatron's
    TP/PP). Colocated: the world is cut into world_size / engine_tp engines."""
    mem_fraction_static: float = 0.5
    """SGLang: fraction of the GPU memory free when the engine starts (before Megatron
    allocates) for its weights + KV pool; the trainer's resident state must fit in the rest
    (``sept-megatron plan`` computes both, with SGLang 0.5.21's formula)."""
    server_urls: list[str] = field(default_factory=list)
    """Disaggregated placement: the SGLang servers' base URLs (http://host:port)."""
    weights: str = "native"
    """Weights sent to the engine each round: native (the trainer's dtype) or fp8 (128x128
    blockwise e4m3, quantised during the sync; the engine is started from an FP8 config)."""
    tau_start: float = 0.6
    """Sampling temperature tau_s at the start of training."""
    tau_end: float = 1.0
    """Sampling temperature tau_s once the anneal is over."""
    anneal: str = "linear"
    """constant (tau_start throughout), linear or cosine from tau_start to tau_end."""
    anneal_fraction: float = 2.0 / 3.0
    """Fraction of all rounds over which tau_s moves; tau_end afterwards (paper: 2 of 3 epochs)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 samples from the whole distribution."""
    top_k: int = -1
    """Sample among the k most likely tokens; -1: no limit."""
    n: int = 1
    """Answers per question."""
    batch_size: int = 64
    """Sequences per generate() call of the hf backend. A rollout is dealt over the engines in
    whole batches, so one engine and many draw the same samples (exactly when it is a multiple
    of ``n``); engines beyond ceil(prompts x n / batch_size) get nothing to do."""
    bucket_size_mb: int = 512
    """Weight-sync bucket size."""
    device: str = "auto"
    """The hf engine's device: auto (the trainer's compute device on this rank), cpu, cuda:N."""
    hf_static_cache: bool = False
    """hf backend: a preallocated (static) KV cache, with which transformers compiles the
    decoding step into CUDA graphs on a GPU (torch.compile, mode reduce-overhead; the first
    rollout pays the compile). Same greedy tokens as the default dynamic cache. Leave it off on
    the CPU: nothing is compiled there and the static cache alone was slower (README,
    Performance)."""
    timeout_minutes: float = 30.0
    """Longest a rank waits on the rollout engines (its own engine generating, an SGLang server,
    another group's answers, a weight load): the waits run on the CPU (gloo), and past this an
    engine that died or hangs ends every rank, non-zero, with an error naming the engine group
    and what it was doing."""


@dataclass(kw_only=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Question files: verl-style parquet, JSONL or an HF datasets directory."""
    chat_template: str = "auto"
    """auto (the tokenizer's own), the paper's (Fig. 4): qwen-math, qwen-base, qwen-instruct,
    deepseek-math; this project's earlier forms: qwen-instruct-legacy, deepseek-math-legacy;
    plain. See sept_megatron.data.TEMPLATES."""
    max_prompt_length: int = 1024
    """Prompts longer than this (tokens, after the chat template) are dropped from the bank."""
    max_response_length: int = 3072
    """Most new tokens per answer (rollout's max_new_tokens); longer answers are truncated."""
    shuffle_seed: int = 0
    """Seed of the question order (the same order on every rank and after a resume)."""


@dataclass(kw_only=True)
class TrainConfig:
    mode: str = "online"
    """online (SePT), offline (answers generated once by the base model), coupled (tau_s = tau_t);
    the paper's baselines on the same backend (see sept_megatron/loop/modes.py): em (EM-FT, entropy
    minimisation on the model's own answers) and grpo (RL on the grader's 0/1 reward against
    the ground truth, rollout.n answers per question); both sample at tau_s = tau_t."""
    epochs: float = 3.0
    """Passes over the offline answers."""
    """Passes over the question bank (sets the round count unless train.rounds is given)."""
    rounds: int | None = None
    """Stop after this many rounds (default: epochs x bank size / prompts_per_round)."""
    prompts_per_round: int = 128
    """Questions answered (and trained on) per round."""
    mini_batch_size: int = 64
    """Sequences per optimizer step."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one DP rank."""
    lr: float = 1e-7
    """AdamW peak learning rate (paper: 1e-7)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0 to lr, then constant."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon."""
    tau_train: float = 1.0
    """Training temperature tau_t: logits are divided by it in the loss."""
    recompute: str = "none"
    """Activation recomputation (Megatron's own, see model.recompute_kwargs): none; selective
    (Megatron's selective recompute of core attention: large savings with
    model.attention=unfused, almost none with sdpa or TE, whose fused attention keeps no
    [s, s] scores); full (each transformer layer keeps only its input and is recomputed in
    backward: about one more forward pass of compute for the smallest activation memory)."""
    offload_during_rollout: bool = False
    """Move the trainer's weights, gradients and optimizer state to host memory while the
    colocated engine generates, and back before the step (slime's offload_train): the engine's
    KV pool gets the memory the trainer would hold. Costs two host<->device copies of the
    trainer state per round; the planner counts the rollout phase without it."""
    drop_truncated: bool = False
    """Reference behaviour keeps answers that hit max_response_length."""
    lr_schedule_interval: str = "optimizer_step"
    """When the LR scheduler steps, i.e. the unit of ``warmup_steps``: optimizer_step, or round
    (the reference's: verl steps its scheduler once per round, after the round's mini-batches,
    so its 10 warmup steps are 10 rounds = 20 optimizer steps and the LR is constant within a
    round)."""
    lr_decay_style: str = "constant"
    """LR after warmup: constant (SePT's) or cosine (to 0 at the last step: verl's SFT trainer,
    used by the offline ablation, see ``offline``)."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of all scheduler steps (verl's SFT ``warmup_steps_ratio``, floored);
    replaces ``warmup_steps`` when set. null: ``warmup_steps``."""
    loss_aggregation: str = "minibatch_token_mean"
    """How token losses become one gradient: minibatch_token_mean (every response token of the
    mini-batch weighs the same, across micro-batches and data-parallel ranks) or
    microbatch_mean (the reference's, verl's token-mean: each micro-batch's token mean,
    averaged over micro-batches and ranks; short answers weigh more per token)."""
    measure_round_fit: bool = False
    """Also log the loss on each round's own samples before and after its optimizer steps
    (two extra forward passes per round): does SFT fit what the model just wrote?"""
    seed: int = 1234
    """Seed of model-parallel RNGs and of the rollout's sampling streams."""
    kl_coef: float = 0.0
    """train.mode=grpo only: weight of a KL penalty to the initial model (verl's use_kl_loss
    with kl_loss_coef, k3 ``low_var_kl`` estimator), which keeps a frozen copy of the initial
    weights on every rank and costs one more forward pass per mini-batch. 0: off (the
    reference's use_kl_loss=False); verl's coefficient when on is 0.001."""
    max_skipped_updates: int = 3
    """Consecutive optimizer steps whose loss or gradient norm is not finite (the update is
    skipped, counted in ``train/update_skipped``) before the run stops with the round, the step
    and the last finite loss; no checkpoint of those weights is published."""


@dataclass(kw_only=True)
class EvalConfig:
    benchmarks: list[str] = field(default_factory=list)
    """Benchmark files (same formats as data.train_files) for in-training validation."""
    every_n_rounds: int = 0
    """In-training validation period (0: off)."""
    temperature: float = 1.0
    """Sampling temperature of in-training validation."""
    n: int = 4
    """Samples per validation question (pass@k for k up to n)."""
    max_questions: int | None = 64
    """Per benchmark, a fixed subset for in-training validation."""
    max_new_tokens: int | None = None
    """Most new tokens per validation answer; null: data.max_response_length."""
    before_training: bool = False
    """Also validate once before the first round (the reference's ``val_before_train``)."""


@dataclass(kw_only=True)
class OfflineConfig:
    """The offline ablation (``train.mode=offline``): the base model answers the bank once,
    then the model is fine-tuned on those answers. The defaults are the reference's
    (``generate_solutions.sh`` at tau 0.6, then verl's SFT trainer), used when
    ``hyperparameters: sft``; see :func:`sept_megatron.loop.schedule.offline_settings`."""

    hyperparameters: str = "train"
    """train (the ``train:`` section's, i.e. SePT's online settings) or sft (this section's:
    the reference's offline run)."""
    temperature: float | None = None
    """Sampling temperature of the one-off answers (reference: 0.6). null: rollout.tau_start."""
    lr: float = 1e-5
    """Peak learning rate of the offline SFT (verl SFT's ``optim.lr``)."""
    adam_beta1: float = 0.9
    """AdamW beta1 of the offline SFT."""
    adam_beta2: float = 0.95
    """AdamW beta2 of the offline SFT (verl SFT's default betas are (0.9, 0.95))."""
    weight_decay: float = 0.01
    """AdamW weight decay of the offline SFT."""
    lr_decay_style: str = "cosine"
    """LR decay after warmup: cosine (verl SFT's) or constant."""
    warmup_ratio: float = 0.01
    """Warmup over this fraction of all optimizer steps (verl's ``warmup_steps_ratio``)."""
    sequences_per_step: int = 128
    """Answers per optimizer step (verl SFT's ``train_batch_size``); one step per round."""
    epochs: float = 3.0
    """Passes over the offline answers."""


@dataclass(kw_only=True)
class LoggingConfig:
    run_dir: str = "runs/sept"
    """Where metrics.jsonl, samples/, checkpoints/ and hf_final/ are written."""
    wandb_mode: str = "disabled"
    """online, offline or disabled."""
    wandb_project: str = "sept_megatron"
    """W&B project (when wandb_mode is not disabled)."""
    run_name: str | None = None
    """W&B run name; null: W&B picks one."""
    save_samples: bool = True
    """Write each round's prompts and answers to run_dir/samples/round_N.jsonl."""
    progress: bool = True
    """Progress bars on rank 0."""
    wandb_group: str | None = None
    """W&B group of the experiment: give the base sweep, the training run and the final
    evaluation the same value (``sept-megatron eval --wandb-group``). null: the name of
    ``run_dir``."""
    wandb_job_type: str = "train"
    """W&B job type of this run within its group (eval uses eval, the demo train-offline ...)."""
    samples_every: int = 10
    """Log a W&B table of the round's samples (question, answer, length, finish reason,
    tau_s) every this many rounds; 0: never. The JSONL files hold every round regardless."""
    peak_tflops: float | None = None
    """The device's peak dense bf16 TFLOP/s, for MFU. null: looked up from the GPU's name
    (H100, H200, A100, B200, ...; see telemetry.PEAK_BF16_TFLOPS); on CPU or an unknown GPU
    only TFLOP/s is logged."""


@dataclass(kw_only=True)
class CheckpointConfig:
    save_every_n_rounds: int = 0
    """0: only at the end."""
    keep_last: int = 2
    """Training checkpoints kept on disk; older ones are deleted after each save."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""
    export_hf: bool = True
    """Write an HF checkpoint of the final model to run_dir/hf_final."""
    async_save: bool = True
    """Write training checkpoints in the background (dist_checkpointing's async save): training
    waits only while the tensors are staged in host memory, a forked process writes them, and
    the rename + ``latest`` pointer happen once every rank's writer is done (a job killed
    mid-save resumes from the previous checkpoint). At most one save is in flight; the run
    waits for it before the next save and at the end. false: the round waits for the disk."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save started (0: off);
    rank 0's clock decides for every rank. Combines with save_every_n_rounds (either one)."""
    on_save_error: str = "stop"
    """A save that fails (full disk: less free space than the last save's size, or ENOSPC at
    any write) is never published and the previous checkpoint stays the latest. stop: the run
    ends with an error naming the path and the space needed; warn: it logs the error, counts
    it in ``checkpoint/save_failures`` and tries again at the next save."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """Raised with every problem found, one per line."""


# --- loading -----------------------------------------------------------------------------
def _from_dict(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field; valid fields of "
            f"{prefix.rstrip('.') or 'config'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _from_dict(kind, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind, where: str) -> Any:
    """Turn YAML / command-line values into the annotated type, or explain why not."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or value == "null" or value == "none":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r}: expected a list (YAML list or a,b,c)")
        return [_coerce(v, args[0], where) for v in value]
    try:
        if kind is bool:
            return _to_bool(value)
        if kind is int:
            return _to_int(value)
        if kind in (float, str):
            return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r}: expected {kind.__name__}") from None
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value) if isinstance(value, (str, float)) else value
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(value)
    return int(number)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=1e-6")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + ``key=value`` overrides -> a typed :class:`Config`."""
    tree: dict[str, Any] = {}
    if path:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    for override in overrides:
        _apply_override(tree, override)
    return _from_dict(Config, tree, "")


# --- validation --------------------------------------------------------------------------
_CHOICES = {
    "model.params_dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.transformer_impl": ("auto", "transformer_engine", "local"),
    "model.attention": ("sdpa", "unfused"),
    "model.fp8": (None, "delayed", "tensorwise", "blockwise"),
    "model.fp8_format": ("e4m3", "hybrid"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.device": ("auto", "cuda", "cpu"),
    "rollout.placement": ("colocated", "disaggregated"),
    "rollout.weights": ("native", "fp8"),
    "train.recompute": ("none", "selective", "full"),
    "rollout.anneal": ("constant", "linear", "cosine"),
    "data.chat_template": (
        "auto",
        "qwen-math",
        "qwen-base",
        "qwen-instruct",
        "deepseek-math",
        "qwen-instruct-legacy",
        "deepseek-math-legacy",
        "plain",
    ),
    "train.mode": ("online", "offline", "coupled", "em", "grpo"),
    "train.lr_schedule_interval": ("optimizer_step", "round"),
    "train.lr_decay_style": ("constant", "cosine"),
    "train.loss_aggregation": ("minibatch_token_mean", "microbatch_mean"),
    "offline.hyperparameters": ("train", "sft"),
    "offline.lr_decay_style": ("constant", "cosine"),
    "logging.wandb_mode": ("online", "offline", "disabled"),
    "checkpoint.on_save_error": ("stop", "warn"),
}


def _get(cfg: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config, world_size: int, arch=None) -> None:
    """Check the whole tree (and, given the model's ``ModelArch``, its divisibility rules)."""
    errors: list[str] = []
    err = errors.append
    for dotted, choices in _CHOICES.items():
        if _get(cfg, dotted) not in choices:
            err(f"{dotted}={_get(cfg, dotted)!r}: choose one of {', '.join(map(str, choices))}")
    _validate_backend(cfg.rollout, arch, err)
    m, p, r, t = cfg.model, cfg.parallel, cfg.rollout, cfg.train
    if not m.hf_path:
        err("model.hf_path is not set: point it at an HF checkpoint dir (config + tokenizer)")
    for dotted in (
        "parallel.tensor_parallel",
        "parallel.pipeline_parallel",
        "train.prompts_per_round",
        "train.mini_batch_size",
        "train.micro_batch_size",
        "rollout.n",
        "rollout.batch_size",
        "rollout.bucket_size_mb",
        "rollout.engine_tp",
        "data.max_prompt_length",
        "data.max_response_length",
        "model.make_vocab_size_divisible_by",
    ):
        if _get(cfg, dotted) < 1:
            err(f"{dotted}={_get(cfg, dotted)}: must be >= 1")
    for dotted in ("rollout.tau_start", "rollout.tau_end", "train.tau_train"):
        if not _get(cfg, dotted) > 0:
            err(
                f"{dotted}={_get(cfg, dotted)}: temperatures must be > 0 (greedy is not a "
                "training distribution)"
            )
    if not 0 < r.anneal_fraction <= 1:
        err(f"rollout.anneal_fraction={r.anneal_fraction}: must be in (0, 1]")
    if not 0 < r.top_p <= 1:
        err(f"rollout.top_p={r.top_p}: must be in (0, 1]")
    if p.gpu_mem_gb is not None and p.gpu_mem_gb <= 0:
        err(f"parallel.gpu_mem_gb={p.gpu_mem_gb}: must be > 0 GiB, or null (the device's own)")
    if not p.timeout_minutes > 0:
        err(
            f"parallel.timeout_minutes={p.timeout_minutes}: must be > 0 (minutes a collective "
            "may wait before the job fails)"
        )
    _validate_faults(cfg, err)
    if not 0 < r.mem_fraction_static < 1:
        err(f"rollout.mem_fraction_static={r.mem_fraction_static}: must be in (0, 1)")
    if t.lr <= 0 or t.epochs <= 0 or t.grad_clip < 0 or t.warmup_steps < 0:
        err("train.lr and train.epochs must be > 0, train.grad_clip and train.warmup_steps >= 0")
    if m.fp8 and m.transformer_impl == "local":
        err(
            "model.fp8 needs Transformer Engine: set model.transformer_impl=auto or "
            "transformer_engine (and run on GPU), or model.fp8=null"
        )
    _validate_schedule_fields(cfg, err)
    _validate_fp8(cfg, arch, err)
    _validate_grpo(cfg, err)
    _validate_layout(cfg, world_size, arch, err)
    _validate_logging(cfg.logging, err)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _validate_backend(rollout: RolloutConfig, arch, err) -> None:
    """``rollout.backend`` names a registered backend, which checks its own settings."""
    from sept_megatron.rollout.registry import backend_class

    try:
        backend = backend_class(rollout.backend)
    except (ValueError, ImportError) as exc:
        err(str(exc))
        return
    for problem in backend.check_config(rollout, arch=arch):
        err(problem)


def _validate_schedule_fields(cfg: Config, err) -> None:
    """The LR schedule's ratio and the offline section's numbers."""
    t, o = cfg.train, cfg.offline
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        err(f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1), or null (warmup_steps)")
    if not 0 <= o.warmup_ratio < 1:
        err(f"offline.warmup_ratio={o.warmup_ratio}: must be in [0, 1)")
    if o.temperature is not None and not o.temperature > 0:
        err(f"offline.temperature={o.temperature}: must be > 0, or null (rollout.tau_start)")
    if (
        t.mode == "offline"
        and o.hyperparameters == "sft"
        and cfg.rollout.n >= 1
        and o.sequences_per_step % cfg.rollout.n
    ):
        err(
            f"offline.sequences_per_step={o.sequences_per_step} is not a multiple of rollout.n="
            f"{cfg.rollout.n}: a round takes whole questions; change either"
        )
    if not (o.lr > 0 and o.epochs > 0 and o.sequences_per_step >= 1):
        err(
            f"offline.lr={o.lr}, offline.epochs={o.epochs}, offline.sequences_per_step="
            f"{o.sequences_per_step}: must be > 0 (sequences_per_step >= 1)"
        )


def _validate_faults(cfg: Config, err) -> None:
    """Save cadence and the limits that turn a stuck or diverged run into a clear stop."""
    if cfg.checkpoint.every_minutes < 0:
        err(f"checkpoint.every_minutes={cfg.checkpoint.every_minutes}: must be >= 0 (0: off)")
    if cfg.train.max_skipped_updates < 1:
        err(
            f"train.max_skipped_updates={cfg.train.max_skipped_updates}: must be >= 1 "
            "(consecutive non-finite steps tolerated before the run stops)"
        )
    if not cfg.rollout.timeout_minutes > 0:
        err(
            f"rollout.timeout_minutes={cfg.rollout.timeout_minutes}: must be > 0 (minutes a "
            "rank waits on the rollout before the job fails)"
        )


def _validate_grpo(cfg: Config, err) -> None:
    """GRPO compares the answers of one question with each other: it needs a group of them,
    all of them (a truncated answer is graded wrong, not dropped, as in verl)."""
    if cfg.train.kl_coef < 0:
        err(f"train.kl_coef={cfg.train.kl_coef}: must be >= 0 (0: no KL penalty)")
    if cfg.train.mode != "grpo":
        if cfg.train.kl_coef:
            err(
                f"train.kl_coef={cfg.train.kl_coef}: the KL to the initial model is GRPO's "
                f"(train.mode=grpo), not train.mode={cfg.train.mode}; set train.kl_coef=0"
            )
        return
    if cfg.rollout.n < 2:
        err(
            f"rollout.n={cfg.rollout.n}: train.mode=grpo normalises rewards within each "
            "question's answers; set rollout.n >= 2 (the reference uses 8)"
        )
    if cfg.train.drop_truncated:
        err(
            "train.drop_truncated=true: train.mode=grpo keeps every answer of a group (a "
            "truncated one scores 0); set train.drop_truncated=false"
        )


def _validate_fp8(cfg: Config, arch, err) -> None:
    """FP8 training (TE): what the config alone can rule out."""
    m = cfg.model
    if m.fp8 and cfg.parallel.device == "cpu":
        err(
            f"model.fp8={m.fp8} needs a Hopper GPU but parallel.device=cpu; set "
            "parallel.device=auto (or cuda), or model.fp8=null"
        )
    if arch is None:
        return
    if m.fp8 and cfg.parallel.tensor_parallel >= 1:
        from sept_megatron.trainer.fp8 import fp8_shape_problems

        for problem in fp8_shape_problems(arch, cfg.parallel.tensor_parallel):
            err(f"model.fp8={m.fp8}: {problem}; use a TP that keeps it a multiple, or model.fp8=null")


def _validate_logging(logging: LoggingConfig, err) -> None:
    if logging.samples_every < 0:
        err(f"logging.samples_every={logging.samples_every}: must be >= 0 (0: no samples table)")
    if logging.peak_tflops is not None and not logging.peak_tflops > 0:
        err(
            f"logging.peak_tflops={logging.peak_tflops}: must be > 0 (the device's peak dense "
            "bf16 TFLOP/s), or null to look it up from the GPU's name"
        )
    for dotted, value in (
        ("logging.wandb_group", logging.wandb_group),
        ("logging.wandb_job_type", logging.wandb_job_type),
    ):
        if value is not None and not 0 < len(value) <= 128:
            err(f"{dotted}={value!r}: must be 1 to 128 characters; shorten it")


def _validate_layout(cfg: Config, world_size: int, arch, err) -> None:
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        for problem in layout_problems(p, world_size, arch):
            err(problem)
        return
    dp = world_size // (tp * pp)
    samples = t.prompts_per_round * cfg.rollout.n
    if t.mini_batch_size >= 1 and samples % t.mini_batch_size:
        err(
            f"train.prompts_per_round x rollout.n = {samples} is not divisible by "
            f"train.mini_batch_size={t.mini_batch_size}"
        )
    if t.micro_batch_size >= 1 and t.mini_batch_size % (dp * t.micro_batch_size):
        err(
            f"train.mini_batch_size={t.mini_batch_size} is not divisible by data-parallel size "
            f"{dp} x train.micro_batch_size={t.micro_batch_size}; change either"
        )
    for problem in layout_problems(p, world_size, arch):
        err(problem)


def layout_problems(p: ParallelConfig, world_size: int, arch=None) -> list[str]:
    """The parallel layout against the world size and the model's shapes (what a conversion
    tool checks too); every problem names the field and the fix."""
    problems: list[str] = []
    err = problems.append
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if tp < 1 or pp < 1:
        return problems
    if world_size % (tp * pp):
        err(
            f"world size {world_size} is not divisible by parallel.tensor_parallel={tp} x "
            f"parallel.pipeline_parallel={pp} = {tp * pp}; launch a multiple of {tp * pp} "
            "processes"
        )
        return problems
    vpp = p.virtual_pipeline
    if vpp is not None and (vpp < 2 or pp < 2):
        err(f"parallel.virtual_pipeline={vpp}: needs pipeline_parallel >= 2 and a value >= 2, or null")
    if p.sequence_parallel and tp == 1:
        err("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
    if arch is None:
        return problems
    if arch.num_attention_heads % tp:
        err(
            f"parallel.tensor_parallel={tp} does not divide the model's "
            f"{arch.num_attention_heads} attention heads"
        )
    if arch.num_query_groups % tp:
        err(
            f"parallel.tensor_parallel={tp} does not divide the model's {arch.num_query_groups} "
            "key/value heads (query groups); use a TP that divides both head counts"
        )
    if arch.ffn_hidden_size % tp:
        err(f"parallel.tensor_parallel={tp} does not divide ffn size {arch.ffn_hidden_size}")
    stages = pp * (vpp or 1)
    if arch.num_layers % stages:
        layout = (
            f"parallel.pipeline_parallel={pp} x parallel.virtual_pipeline={vpp} = {stages} stages"
            if vpp
            else f"parallel.pipeline_parallel={pp}"
        )
        err(
            f"{layout} does not divide the model's {arch.num_layers} layers; choose a "
            "pipeline size (x virtual stages) that divides the layer count"
        )
    return problems
