"""Will it fit? The per-GPU memory of a SePT layout, known before a job is queued.

    sept-megatron plan --config examples/qwen2.5-math-7b.yaml --nodes 1 --gpus-per-node 8 --gpu-mem-gb 80
    sept-megatron plan --config X.yaml --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 --hf-config llama70b/config.json

Every line is a closed-form byte count for one GPU, from the architecture (the recipe's
``model.hf_path`` config.json, or ``--hf-config``) and the config; nothing is loaded or
allocated. Exit status: 0 fits, 1 does not fit, 2 config error.

- **Weights, activations**: :mod:`sept_megatron.plan.memory` (what the code keeps, checked against
  measured peaks in tests/plan). Attention through SDPA / flash / TE keeps no s x s scores;
  Megatron's unfused ``DotProductAttention`` (the local spec without SDPA) does, which
  :func:`resolve_kernels` finds out by inspecting the layer spec; the table names the path.
- **Gradients**: Megatron DDP with ``grad_reduce_in_fp32`` keeps one fp32 main-grad buffer
  for every parameter of the rank (4 bytes/param), also with the distributed optimizer, which
  reduce-scatters into that full buffer.
- **Optimizer**: Megatron's mixed-precision Adam keeps fp32 master weights and both moments
  (12 bytes/param; 8 for fp32 params, which are their own master); the distributed optimizer
  shards them over data-parallel ranks.
- **Rollout engine**: the backend's own memory model says what its engine holds
  (:mod:`sept_megatron.rollout.memory_model`; SGLang's static pool in
  :mod:`~sept_megatron.rollout.sglang_memory`, the hf engine's full copy in
  :mod:`~sept_megatron.rollout.hf_memory`), given the engine's share of the round's sequences
  at full length and the trainer state kept beside it. Colocated, the engine's memory is
  released while Megatron trains, so the peak is the larger of the two phases; the trainer's
  weights, gradient buffer and optimizer state stay resident in both (unless
  ``train.offload_during_rollout``). Disaggregated engines are checked per engine GPU on their
  own.

A fixed reserve (CUDA contexts, NCCL buffers, allocator slack) is added to every phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

from sept_megatron.config import Config, ConfigError
from sept_megatron.plan.memory import (
    Kernels,
    backward_working_bytes,
    logits_bytes,
    param_counts,
    score_buffer_bytes,
    stage_activations,
    stage_params,
)
from sept_megatron.rollout.base import RolloutBackend
from sept_megatron.rollout.memory_model import GIB, EngineGPU, EngineMemoryModel, MemoryLine, divisors
from sept_megatron.rollout.registry import backend_class, backend_names

DEFAULT_RESERVE_GIB = 4.0
"""CUDA context of the trainer (~0.6 GiB), NCCL communicators and buffers (1-2 GiB), caching
allocator slack. The same figure is used on CPU when ``parallel.gpu_mem_gb`` asks for a check."""
PROPOSAL_HEADROOM = 0.95
"""Proposed layouts keep 5% of the GPU spare on top of the reserve: estimates run a few
percent off (tests/plan/test_memory_estimate.py), and a proposal should not sit on the edge."""
RECOMPUTE_CHOICES = ("none", "selective", "full")


# --- inputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    reserve_gib: float = DEFAULT_RESERVE_GIB

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline: int | None
    data_parallel: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str
    engine_tp: int
    backend: str
    engine_settings: tuple[tuple[str, float], ...] = ()
    """The backend's memory settings (:meth:`EngineMemoryModel.settings`), as name/value pairs."""

    def describe(self) -> str:
        vpp = f" VPP={self.virtual_pipeline}" if self.virtual_pipeline else ""
        sp = " SP" if self.sequence_parallel else ""
        settings = ", ".join(f"{name} {value:g}" for name, value in self.engine_settings)
        engine = f"engine TP={self.engine_tp}" + (f" ({settings})" if settings else "")
        return (
            f"TP={self.tensor_parallel} PP={self.pipeline_parallel}{vpp} DP={self.data_parallel}"
            f"{sp} recompute={self.recompute} | {self.backend} {engine}"
        )


def layout_from_config(cfg: Config, world: int) -> Layout:
    p, r = cfg.parallel, cfg.rollout
    dp = max(1, world // (p.tensor_parallel * p.pipeline_parallel))
    return Layout(
        p.tensor_parallel,
        p.pipeline_parallel,
        p.virtual_pipeline,
        dp,
        p.sequence_parallel,
        p.use_distributed_optimizer,
        cfg.train.recompute,
        r.engine_tp,
        r.backend,
        tuple(memory_model(r.backend).settings(r).items()),
    )


def memory_model(backend: str) -> EngineMemoryModel:
    """The memory model of ``rollout.backend=backend`` (:mod:`sept_megatron.rollout.registry`)."""
    cls = backend_class(backend)
    if not isinstance(cls, RolloutBackend):
        raise ConfigError(
            f"rollout.backend={backend}: {cls.__name__} does not implement "
            "sept_megatron.rollout.base.RolloutBackend (memory_model() among others), so the "
            "planner cannot count its engine's memory; add the missing class methods"
        )
    return cls.memory_model()


def engine_rollout(cfg: Config, layout: Layout):
    """The ``rollout`` section as ``layout`` runs it: its backend, engine TP and settings."""
    return dataclasses.replace(
        cfg.rollout, backend=layout.backend, engine_tp=layout.engine_tp, **dict(layout.engine_settings)
    )


# --- the estimate -----------------------------------------------------------------------------
Line = MemoryLine  # label, GiB, counted (part of the phase total; alternatives are shown only)


@dataclass
class StageMemory:
    name: str
    training: list[Line] = field(default_factory=list)
    rollout: list[Line] = field(default_factory=list)

    @property
    def resident_gib(self) -> float:
        return sum(l.gib for l in self.training if l.counted and l.label.startswith(_RESIDENT))

    @property
    def training_gib(self) -> float:
        return sum(l.gib for l in self.training if l.counted)

    @property
    def rollout_gib(self) -> float:
        return sum(l.gib for l in self.rollout if l.counted)


_RESIDENT = ("weights", "gradients", "optimizer")


@dataclass
class Estimate:
    layout: Layout
    hardware: Hardware
    kernels: Kernels
    stages: list[StageMemory]
    engine_gpu: StageMemory | None  # disaggregated: one engine GPU
    engines: int
    problems: list[str]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def peak_gib(self) -> float:
        gpus = self.stages + ([self.engine_gpu] if self.engine_gpu else [])
        return max(max(s.training_gib, s.rollout_gib) for s in gpus) + self.hardware.reserve_gib


def estimate(
    cfg: Config, arch, hardware: Hardware, kernels: Kernels, layout: Layout | None = None
) -> Estimate:
    """Per-GPU memory of ``layout`` (default: the config's) on ``hardware``."""
    from sept_megatron.trainer.model import padded_vocab_size

    layout = layout or layout_from_config(cfg, hardware.world)
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    counts = param_counts(arch, padded)
    seq_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    micro_batches = max(1, cfg.train.mini_batch_size // (dp * cfg.train.micro_batch_size))
    sharded = layout.distributed_optimizer and dp > 1
    opt_bytes = 12 if kernels.param_bytes < 4 else 8
    stages = []
    for stage in sorted({0, pp - 1}):
        name = "GPU" if pp == 1 else ("first stage" if stage == 0 else "last stage")
        params, linear = stage_params(counts, tp, pp, stage)
        mem = StageMemory(name)
        mem.training += [
            Line("weights", params * kernels.param_bytes / GIB),
            Line("gradients: fp32 main-grad buffer", params * 4 / GIB),
            Line(
                f"optimizer: fp32 master + Adam m, v, {'sharded /DP' if sharded else 'whole'}",
                params * opt_bytes / (dp if sharded else 1) / GIB,
            ),
        ]
        if dp > 1:
            mem.training.append(
                Line(
                    "  (other choice: "
                    + ("whole, no distributed optimizer)" if sharded else f"distributed optimizer /DP={dp})"),
                    params * opt_bytes / (1 if sharded else dp) / GIB,
                    counted=False,
                )
            )
        if kernels.fp8:
            mem.training.append(Line("FP8 weight copies (TE, row + column-wise)", linear * 2 / GIB))
        for recompute in RECOMPUTE_CHOICES:
            used = recompute == layout.recompute
            act = stage_activations(
                arch,
                kernels,
                tp=tp,
                pp=pp,
                vpp=layout.virtual_pipeline,
                sequence_parallel=layout.sequence_parallel,
                micro_batch=cfg.train.micro_batch_size,
                seq_len=seq_len,
                micro_batches=micro_batches,
                stage=stage,
                recompute=recompute,
            )
            label = (
                f"activations kept, recompute={recompute}" if used else f"  (kept with recompute={recompute})"
            )
            mem.training.append(Line(label, act / GIB, counted=used))
        mem.training += _working_set(cfg, arch, kernels, layout, padded, stage)
        mem.training += mode_lines(cfg, layout, padded, stage)
        if cfg.train.mode == "grpo" and cfg.train.kl_coef:  # a frozen copy of this stage
            weights = next(line.gib for line in mem.training if line.label == "weights")
            mem.training.append(Line("grpo: the initial model's weights (KL, train.kl_coef)", weights))
        stages.append(mem)
    problems: list[str] = []
    notes: list[str] = []
    engine_gpu, engines = _rollout(cfg, arch, hardware, layout, stages, problems, notes)
    notes += mode_notes(cfg)
    for mem in stages + ([engine_gpu] if engine_gpu else []):
        for phase, gib in (("training", mem.training_gib), ("rollout", mem.rollout_gib)):
            if gib + hardware.reserve_gib > hardware.gpu_mem_gib:
                where = "" if pp == 1 else f" on the {mem.name}"
                problems.append(
                    f"{phase} phase{where} needs {gib + hardware.reserve_gib:.1f} GiB "
                    f"(with the {hardware.reserve_gib:g} GiB reserve) of "
                    f"{hardware.gpu_mem_gib:g} GiB per GPU"
                )
    return Estimate(layout, hardware, kernels, stages, engine_gpu, engines, problems, notes)


def _working_set(
    cfg: Config, arch, kernels: Kernels, layout: Layout, padded_vocab: int, stage: int
) -> list[Line]:
    """The transient on top of the kept activations: the larger of the head's logits (last
    stage) and one layer's backward gradients; the unfused attention's score buffer."""
    tp, seq_len = layout.tensor_parallel, cfg.data.max_prompt_length + cfg.data.max_response_length
    tokens = cfg.train.micro_batch_size * seq_len
    backward = backward_working_bytes(
        arch,
        kernels,
        tp=tp,
        sequence_parallel=layout.sequence_parallel,
        seq_len=seq_len,
        recompute=layout.recompute,
    )
    head = (
        logits_bytes(arch, kernels, padded_vocab / tp, tp, layout.sequence_parallel)
        if stage == layout.pipeline_parallel - 1
        else 0.0
    )
    label = (
        "working set: logits + loss copies (fp32)"
        if head > backward
        else "working set: one layer's backward"
        + (" (rebuilt + grads)" if layout.recompute == "full" else " gradients")
    )
    lines = [Line(label, tokens * max(head, backward) / GIB)]
    buffer = score_buffer_bytes(arch, kernels, tp=tp, seq_len=seq_len)
    if buffer:
        lines.append(Line("unfused attention's score buffer (a s^2 b)", tokens * buffer / GIB))
    return lines


def mode_lines(cfg: Config, layout: Layout, padded_vocab: int, stage: int) -> list[Line]:
    """What train.mode em / grpo add on the last stage (sept_megatron.trainer.losses): the entropy's
    fp32 copies of the vocab-parallel logits (shifted, exp, weighted: ~4 alive at once), and
    for GRPO the old log-probs of this DP rank's share of the round (fp32 per token)."""
    mode = cfg.train.mode
    if mode not in ("em", "grpo") or stage != layout.pipeline_parallel - 1:
        return []
    seq_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    tokens = cfg.train.micro_batch_size * seq_len
    lines = [
        Line(
            f"{mode}: entropy's fp32 copies of the logits",
            tokens * 16 * padded_vocab / layout.tensor_parallel / GIB,
        )
    ]
    if mode == "grpo":
        sequences = math.ceil(cfg.train.prompts_per_round * cfg.rollout.n / layout.data_parallel)
        lines.append(
            Line(
                f"grpo: old log-probs, {sequences} sequences x {seq_len} tokens",
                sequences * seq_len * 4 / GIB,
            )
        )
    return lines


def mode_notes(cfg: Config) -> list[str]:
    """The compute a mode adds (time, not memory): GRPO's n-fold rollout and its extra forward."""
    t, n = cfg.train, cfg.rollout.n
    if t.mode != "grpo":
        return []
    sequences = t.prompts_per_round * n
    extra = (
        "one extra forward pass over them before the first update (old log-probs, about "
        "a third of a training step's compute)"
        if sequences > t.mini_batch_size
        else "no extra forward (one update per rollout: the ratio is 1)"
    )
    kl = (
        "; train.kl_coef: one more forward pass per mini-batch, through the initial model"
        if t.kl_coef
        else ""
    )
    return [
        f"grpo: {t.prompts_per_round} questions x rollout.n={n} = {sequences} sequences "
        f"generated and trained per round; {extra}{kl}"
    ]


# --- rollout --------------------------------------------------------------------------------
def engine_weights_gib(cfg: Config, arch) -> float:
    """The whole model as an engine loads it: bf16, or FP8 linear layers with
    ``rollout.weights=fp8`` (the backend shards it over its engine TP)."""
    counts = param_counts(arch, arch.vocab_size)
    linear = counts.num_layers * counts.layer_linear
    linear_bytes = 1 if cfg.rollout.weights == "fp8" else 2
    return ((counts.total - linear) * 2 + linear * linear_bytes) / GIB


def engine_count(cfg: Config, hardware: Hardware, layout: Layout) -> int:
    r = cfg.rollout
    engines = len(r.server_urls) if r.placement == "disaggregated" else hardware.world // layout.engine_tp
    return max(1, engines)


def engine_gpu(
    cfg: Config, arch, hardware: Hardware, layout: Layout, name: str, resident: float
) -> EngineGPU:
    """What the backend's memory model is asked about: one GPU hosting an engine with its share
    of the round, ``resident`` GiB of trainer state beside it."""
    share = math.ceil(cfg.train.prompts_per_round * cfg.rollout.n / engine_count(cfg, hardware, layout))
    return EngineGPU(
        rollout=engine_rollout(cfg, layout),
        arch=arch,
        weights_gib=engine_weights_gib(cfg, arch),
        share=share,
        prompt_tokens=cfg.data.max_prompt_length,
        response_tokens=cfg.data.max_response_length,
        gpu_mem_gib=hardware.gpu_mem_gib,
        reserve_gib=hardware.reserve_gib,
        resident_gib=resident,
        colocated=cfg.rollout.placement != "disaggregated",
        name=name,
    )


def resident_beside_engine(cfg: Config, mem: StageMemory) -> float:
    """Trainer state left on a GPU while its engine generates: none disaggregated or offloaded."""
    if cfg.rollout.placement == "disaggregated" or cfg.train.offload_during_rollout:
        return 0.0
    return mem.resident_gib


def _rollout(
    cfg: Config,
    arch,
    hardware: Hardware,
    layout: Layout,
    stages: list[StageMemory],
    problems: list[str],
    notes: list[str],
) -> tuple[StageMemory | None, int]:
    """Fill the rollout lines of each GPU that hosts an engine from the backend's memory model;
    return the engine GPU (disaggregated placement) and the number of engines."""
    model = memory_model(layout.backend)
    disaggregated = cfg.rollout.placement == "disaggregated"
    hosts = [StageMemory("engine GPU")] if disaggregated else stages
    for mem in hosts:
        resident = resident_beside_engine(cfg, mem)
        if not disaggregated:
            label = (
                "trainer state offloaded to host memory (train.offload_during_rollout)"
                if cfg.train.offload_during_rollout
                else "trainer state kept resident (weights, grads, optimizer)"
            )
            mem.rollout.append(Line(label, resident))
        engine = model.estimate(engine_gpu(cfg, arch, hardware, layout, mem.name, resident))
        mem.rollout += engine.generating
        mem.training += engine.released
        problems += [p for p in engine.problems if p not in problems]
        notes += engine.notes
    return (hosts[0] if disaggregated else None), engine_count(cfg, hardware, layout)


# --- proposals ------------------------------------------------------------------------------
def candidate_layouts(cfg: Config, arch, hardware: Hardware):
    """Every layout the config validation would accept on ``hardware``, trainer and engine."""
    t, world = cfg.train, hardware.world
    for tp in divisors(hardware.gpus_per_node):
        if arch.num_attention_heads % tp or arch.num_query_groups % tp or arch.ffn_hidden_size % tp:
            continue
        for pp in divisors(arch.num_layers):
            if world % (tp * pp) or tp * pp > world:
                continue
            dp = world // (tp * pp)
            if t.mini_batch_size % (dp * t.micro_batch_size):
                continue
            for recompute in RECOMPUTE_CHOICES:
                yield tp, pp, dp, recompute


def engine_choices(cfg: Config, arch, hardware: Hardware) -> list[tuple[str, int]]:
    """(backend, engine TP) pairs to try: the config's backend first, then every other backend
    that can shard its engine over several GPUs (for a model one GPU cannot hold)."""
    shape = dict(gpus_per_node=hardware.gpus_per_node, world=hardware.world)
    configured = cfg.rollout.backend
    choices = [(configured, tp) for tp in memory_model(configured).engine_tps(arch, **shape)]
    for name in backend_names():
        if name == configured or not isinstance(backend_class(name), RolloutBackend):
            continue
        tps = memory_model(name).engine_tps(arch, **shape)
        if max(tps, default=1) > 1:
            choices += [(name, tp) for tp in tps]
    return choices


def propose(cfg: Config, arch, hardware: Hardware, kernels: Kernels, limit: int = 4) -> list[Estimate]:
    """The smallest fitting layouts on ``hardware``: fewest model-parallel GPUs (most data
    parallelism), then the least recomputation, then TP before PP, then the narrowest engine."""
    found = []
    for tp, pp, dp, recompute in candidate_layouts(cfg, arch, hardware):
        fitting = []
        for backend, etp in engine_choices(cfg, arch, hardware):
            settings = memory_model(backend).settings(dataclasses.replace(cfg.rollout, backend=backend))
            layout = Layout(
                tp,
                pp,
                None,
                dp,
                tp > 1,
                cfg.parallel.use_distributed_optimizer,
                recompute,
                etp,
                backend,
                tuple(settings.items()),
            )
            result = _with_engine_tuned(cfg, arch, hardware, kernels, layout)
            if result.fits and result.peak_gib <= PROPOSAL_HEADROOM * hardware.gpu_mem_gib:
                fitting.append(result)
                if not result.notes:
                    break  # the narrowest engine that holds its whole share of the round
        if fitting:
            found.append(next((e for e in fitting if not e.notes), fitting[0]))
    order = {c: i for i, c in enumerate(RECOMPUTE_CHOICES)}
    found.sort(
        key=lambda e: (
            e.layout.tensor_parallel * e.layout.pipeline_parallel,
            order[e.layout.recompute],
            e.layout.pipeline_parallel,
            e.layout.engine_tp,
        )
    )
    # One line per trainer layout: the least recomputation that fits it.
    seen: set[tuple[int, int]] = set()
    found = [
        e
        for e in found
        if (key := (e.layout.tensor_parallel, e.layout.pipeline_parallel)) not in seen and not seen.add(key)
    ]
    return found[:limit]


def _with_engine_tuned(cfg, arch, hardware, kernels, layout: Layout) -> Estimate:
    """Retry a colocated layout with the settings the backend's memory model proposes for the
    GPU with the most trainer state beside its engine (e.g. SGLang's ``mem_fraction_static``
    whose pool holds the engine's sequences)."""
    first = estimate(cfg, arch, hardware, kernels, layout)
    if (first.fits and not first.notes) or cfg.rollout.placement == "disaggregated":
        return first
    busiest = max(first.stages, key=lambda mem: resident_beside_engine(cfg, mem))
    gpu = engine_gpu(cfg, arch, hardware, layout, busiest.name, resident_beside_engine(cfg, busiest))
    settings = tuple((memory_model(layout.backend).tuned(gpu)).items())
    if not settings or settings == layout.engine_settings:
        return first
    return estimate(cfg, arch, hardware, kernels, dataclasses.replace(layout, engine_settings=settings))


# --- rendering ------------------------------------------------------------------------------
def render(result: Estimate, arch, cfg: Config) -> str:
    """The planner's table: layout, per-GPU lines per stage, the verdict."""
    hw, layout = result.hardware, result.layout
    seq_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    counts = param_counts(arch, arch.vocab_size)
    out = [
        f"model: {arch.model_type}, {counts.total / 1e9:.2f}B params (hidden {arch.hidden_size}, "
        f"{arch.num_layers} layers, {arch.num_attention_heads} heads / {arch.num_query_groups} KV "
        f"heads, FFN {arch.ffn_hidden_size}, vocab {arch.vocab_size}"
        f"{', tied embeddings' if arch.tie_word_embeddings else ''})",
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs x {hw.gpu_mem_gib:g} GiB",
        f"layout: {layout.describe()}",
        f"rollout: {cfg.rollout.placement}, {result.engines} engine(s) of {layout.engine_tp} GPU(s)",
        f"kernels: {result.kernels.describe()}",
        f"micro-batch {cfg.train.micro_batch_size} x {seq_len} tokens (prompt "
        f"{cfg.data.max_prompt_length} + response {cfg.data.max_response_length})",
        "",
    ]
    columns = result.stages + ([result.engine_gpu] if result.engine_gpu else [])
    width = 62
    header = f"{'per-GPU memory, GiB':{width}}" + "".join(f"{c.name:>14}" for c in columns)
    out.append(header)
    for phase in ("training", "rollout"):
        labels: list[str] = []  # every column's lines, each column's order kept
        for c in columns:
            at = 0
            for line in getattr(c, phase):
                if line.label in labels:
                    at = labels.index(line.label) + 1
                else:
                    labels.insert(at, line.label)
                    at += 1
        if not labels:
            continue
        out.append(f"{phase} phase")
        for label in labels:
            cells = []
            for c in columns:
                match = [l for l in getattr(c, phase) if l.label == label]
                cells.append(_cell(match[0].gib) if match else f"{'-':>14}")
            out.append(f"  {label:{width - 2}}" + "".join(cells))
        totals = [getattr(c, f"{phase}_gib") for c in columns]
        out.append(f"  {'= ' + phase + ' phase':{width - 2}}" + "".join(map(_cell, totals)))
    out.append(
        f"  {'reserve (CUDA contexts, NCCL, allocator slack)':{width - 2}}"
        + _cell(hw.reserve_gib) * len(columns)
    )
    verdict = "fits" if result.fits else "DOES NOT FIT"
    out += [
        "",
        f"peak {result.peak_gib:.1f} of {hw.gpu_mem_gib:g} GiB per GPU: {verdict} ({_binding(result)})",
    ]
    out += [f"  - {p}" for p in result.problems] + [f"  note: {n}" for n in result.notes]
    return "\n".join(out)


def _cell(gib: float) -> str:
    if gib == 0:
        return f"{0:14d}"
    return f"{gib:14.1f}" if gib >= 10 else f"{gib:14.2f}" if gib >= 0.1 else f"{gib:14.4f}"


def _binding(result: Estimate) -> str:
    """Which phase, GPU and line bind."""
    columns = result.stages + ([result.engine_gpu] if result.engine_gpu else [])
    phase, gpu = max(
        ((p, c) for c in columns for p in ("training", "rollout")),
        key=lambda pc: getattr(pc[1], f"{pc[0]}_gib"),
    )
    biggest = max((l for l in getattr(gpu, phase) if l.counted), key=lambda l: l.gib)
    where = "" if len(columns) == 1 else f" on the {gpu.name}"
    return f"binding: the {phase} phase{where}, largest line: {biggest.label.strip()} {biggest.gib:.1f} GiB"


def render_proposals(proposals: list[Estimate]) -> str:
    if not proposals:
        return (
            "no layout fits this hardware: add nodes, shorten data.max_response_length or "
            "lower train.micro_batch_size"
        )
    lines = ["smallest layouts that fit with 5% to spare (peak GiB per GPU):"]
    for p in proposals:
        lines.append(f"  {p.layout.describe()}  -> {p.peak_gib:.1f}")
    return "\n".join(lines)


# --- entry points -----------------------------------------------------------------------------
def resolve_kernels(cfg: Config, arch, *, on_gpu: bool, te_available: bool) -> Kernels:
    """Activation dtype and layer implementation as ``build_megatron_model`` would choose them."""
    m = cfg.model
    dtype = m.params_dtype if m.params_dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    te = (
        bool(m.fp8)
        or m.transformer_impl == "transformer_engine"
        or (m.transformer_impl == "auto" and on_gpu and te_available)
    )
    return Kernels(
        4 if dtype == "float32" else 2,
        te,
        te or local_attention_is_fused(arch, m.attention),
        bool(m.fp8),
        fused_swiglu=on_gpu,
    )


def local_attention_is_fused(arch, attention: str) -> bool:
    """Does the local layer spec's core attention for ``model.attention`` avoid s x s scores?
    Megatron's own ``DotProductAttention`` (``unfused``) materialises them; anything else there
    (``sdpa``) does not. Read from the spec the model is built with, not assumed."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from sept_megatron.trainer.model import layer_spec

    spec = layer_spec(arch, transformer_engine=False, attention=attention)
    core = spec.submodules.self_attention.submodules.core_attention
    return getattr(core, "module", core) is not DotProductAttention


def check_fits(cfg: Config, arch, world: int) -> Estimate | None:
    """What ``sept-megatron train`` runs before loading any weights: refuse a layout the planner
    says cannot fit, with its table. Memory per GPU: ``parallel.gpu_mem_gb``, else the CUDA
    device's own; on CPU without ``parallel.gpu_mem_gb`` there is nothing to compare and the
    check is skipped (returns None)."""
    import torch

    from sept_megatron.runtime.distributed import launch_env, resolve_device
    from sept_megatron.trainer.model import use_transformer_engine

    on_gpu = resolve_device(cfg.parallel.device) == "cuda"
    gpu_mem = cfg.parallel.gpu_mem_gb
    if gpu_mem is None:
        if not on_gpu:
            return None
        gpu_mem = torch.cuda.get_device_properties(launch_env().local_rank).total_memory / GIB
    per_node = _gpus_per_node(world)
    hardware = Hardware(world // per_node, per_node, gpu_mem)
    kernels = resolve_kernels(
        cfg, arch, on_gpu=on_gpu, te_available=on_gpu and use_transformer_engine(cfg.model.transformer_impl)
    )
    result = estimate(cfg, arch, hardware, kernels)
    if not result.fits:
        raise ConfigError(
            f"the layout does not fit in {gpu_mem:g} GiB per GPU (parallel.gpu_mem_gb or the "
            f"device's own); change the layout before any weights are loaded:\n\n"
            f"{render(result, arch, cfg)}\n\n{render_proposals(propose(cfg, arch, hardware, kernels))}"
        )
    return result


def _gpus_per_node(world: int) -> int:
    """Ranks per node from torchrun (LOCAL_WORLD_SIZE) or Slurm (SLURM_NTASKS_PER_NODE, e.g.
    "8" or "8(x2)"); the whole world when neither says. Only TP proposals depend on it."""
    raw = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or ""
    digits = raw.split("(")[0]
    per_node = int(digits) if digits.isdigit() and int(digits) > 0 else world
    return per_node if world % per_node == 0 else world


def load_arch(cfg: Config, hf_config: str | None):
    """The architecture from ``--hf-config`` (a config.json or its directory), else from
    ``model.hf_path``, through the same reader as training."""
    from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config

    path = hf_config or cfg.model.hf_path
    if not path:
        raise ConfigError(
            "model.hf_path is not set and no --hf-config was given: the planner needs the model's config.json"
        )
    try:
        if os.path.isfile(path):
            from transformers import AutoConfig

            with open(path) as f:
                fields = json.load(f)
            return arch_from_hf_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        return arch_from_hf_config(load_hf_config(path))
    except (OSError, ValueError, KeyError) as exc:
        where = "--hf-config" if hf_config else "model.hf_path"
        raise ConfigError(f"{where}={path!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept-megatron plan",
        description="Per-GPU memory of a config's layout on given hardware; exit 0 if it fits, "
        "1 if not, 2 on a config error.",
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument(
        "--gpu-mem-gb",
        type=float,
        required=True,
        help="memory per GPU in GiB (an H100 80GB has 79.6; train's own check uses the device's figure)",
    )
    parser.add_argument(
        "--hf-config",
        help="config.json (or its dir) to use instead of model.hf_path's: plan without the weights",
    )
    parser.add_argument(
        "--reserve-gb",
        type=float,
        default=DEFAULT_RESERVE_GIB,
        help="per-GPU reserve for CUDA contexts, NCCL and allocator slack",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def main(argv: list[str]) -> int:
    from sept_megatron.config import load_config, validate
    from sept_megatron.plan.published_configs import planning_config

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not args.hf_config:
        args.hf_config, note = planning_config(args.config, cfg.model.hf_path)
        if note:
            print(f"sept-megatron plan: {note}")
    arch = load_arch(cfg, args.hf_config)
    hardware = Hardware(args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.reserve_gb)
    if not cfg.model.hf_path:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=args.hf_config))
    kernels = resolve_kernels(cfg, arch, on_gpu=True, te_available=True)
    print(f"sept-megatron plan: {args.config}")
    try:
        validate(cfg, hardware.world, arch)
    except ConfigError as exc:
        print(f"{exc}\n\n{render_proposals(propose(cfg, arch, hardware, kernels))}")
        return 2
    result = estimate(cfg, arch, hardware, kernels)
    print(render(result, arch, cfg))
    print()
    print(render_proposals(propose(cfg, arch, hardware, kernels)))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
