"""The demo's base model: a tokenizer and a tiny Llama, pretrained by our own Megatron SFT path.

    from sept_megatron.demo.base_model import build_base_model, quick_eval
    hf_dir = build_base_model("~/.cache/sept_megatron/demo")   # ~2-3 min once, then cached

What it builds, and why this way:

1. the task splits (:func:`~sept_megatron.demo.task.build_splits`) and the slip corpus of the
   train split (:func:`~sept_megatron.demo.task.base_corpus`): a fraction of the worked
   solutions carry one arithmetic slip, so the model learns a format it sometimes gets wrong;
2. a SentencePiece tokenizer trained on that corpus (:mod:`sept_megatron.demo.tokenizer`);
3. a random-init transformers model (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, fp32), saved
   as an HF checkpoint and imported into Megatron exactly as a user's real checkpoint is
   (``load_hf_into_model``): the demo exercises the import path, not a side door;
4. pretraining with :class:`~sept_megatron.trainer.sft.SFTTrainer` in a world of one on gloo:
   prompt = the chat-template-rendered question (as the SePT loop renders it), response = the
   solution + ``<|im_end|>``, loss on the response only. The trainer's warmup-then-constant
   schedule is the paper's for SePT; for pretraining we swap in Megatron's own cosine decay,
   which reaches a lower loss in a few hundred steps;
5. :func:`~sept_megatron.weight_sync.sync` pushes the weights into the HF model, the same transport every SePT round
   uses; the held-out NLL of the HF model must match Megatron's, which checks the export;
6. ``save_pretrained`` + the tokenizer, ``recipe.json``, ``train_log.json`` and, last, a marker
   file; the staging directory is then renamed into place, so a reader never sees half a model.

The cache key hashes the recipe, :data:`BUILD_VERSION` and the source of the task and tokenizer
modules (a changed task must not silently reuse a model trained on the old one).

The base must be *imperfect*: SePT can only improve a model whose pass@k is clearly above its
pass@1. :func:`quick_eval` measures that; the default recipe was chosen on the validation split.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sept_megatron.demo import task as task_module
from sept_megatron.demo import tokenizer as tokenizer_module

log = logging.getLogger(__name__)

BUILD_VERSION = "1"
"""Bump when the build procedure changes what a recipe produces (the cache key includes it)."""

MARKER = "BUILD_COMPLETE"
"""Written last into a finished build; a directory without it is not a cache hit."""

FAMILIES = ("llama", "qwen2")


@dataclass(frozen=True, kw_only=True)
class BaseModelRecipe:
    """Everything that determines the base model; its hash names the cache directory.

    Defaults were chosen on the validation split (never test): of the recipes tried, this one
    left the best imperfect base (val, 200 questions: greedy 41%, T=1 pass@1 28%, pass@8 73%)
    in ~500 s of a loaded 2-core machine; smaller or shorter runs left bases near 2-13% pass@1.
    """

    family: str = "llama"
    """HF architecture: "llama" or "qwen2" (q/k/v biases)."""
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 256
    tie_embeddings: bool = False
    max_position_embeddings: int = 256
    """Prompt (~26 tokens) + response (<= 48, or a 64-token rollout budget) fit easily."""
    vocab_size: int = 512
    """Upper bound for SentencePiece; the task corpus yields fewer pieces (~380)."""
    n_train: int = 4000
    """Train-split problems; the val/test splits do not depend on it (see build_splits)."""
    slip_rate: float = 0.2
    """Fraction of corpus solutions with one planted arithmetic slip."""
    steps: int = 1000
    batch_size: int = 64
    """Sequences per optimizer step (one micro-batch: fastest on a CPU)."""
    lr: float = 3e-3
    warmup_steps: int = 50
    lr_decay: str = "cosine"
    """"cosine" (to ``min_lr_ratio * lr``) or "constant" (the SePT trainer's schedule)."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta2: float = 0.95
    length_group: int = 1
    """Sort pools of this many batches by length (1: off); see :func:`_batches`."""
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the fix."""
        if self.family not in FAMILIES:
            raise ValueError(f"BaseModelRecipe.family={self.family!r}; choose one of {FAMILIES}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BaseModelRecipe.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"BaseModelRecipe.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"BaseModelRecipe.lr_decay={self.lr_decay!r}; choose 'cosine' or 'constant'")
        for name in ("steps", "batch_size", "n_train", "num_layers", "length_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"BaseModelRecipe.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.slip_rate <= 1.0:
            raise ValueError(f"BaseModelRecipe.slip_rate={self.slip_rate} must be in [0, 1]")


def recipe_key(recipe: BaseModelRecipe) -> str:
    """Hash of the recipe, the build version and the task/tokenizer source code."""
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    digest.update(BUILD_VERSION.encode())
    for module in (task_module, tokenizer_module):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:12]


def is_complete(hf_dir: str | Path) -> bool:
    return (Path(hf_dir) / MARKER).is_file()


def build_base_model(
    cache_dir: str, recipe: BaseModelRecipe = BaseModelRecipe(), *, progress: bool = True
) -> str:
    """Return ``cache_dir/base-<key>``, building it first unless a complete build is there.

    Deterministic for a given recipe on a given machine and thread count. Must run in a
    single process: it creates a Megatron world of one if none exists (and tears down only
    what it created), or reuses an existing world of one with TP = PP = 1.
    """
    recipe.validate()
    key = recipe_key(recipe)
    final = Path(cache_dir).expanduser() / f"base-{key}"
    if is_complete(final):
        log.info("base model cache hit: %s", final)
        return str(final)
    if final.exists():
        log.warning("removing incomplete base model build %s", final)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _build_into(staging, recipe, key, progress)
        try:
            os.rename(staging, final)
        except OSError:
            if not is_complete(final):  # not a concurrent builder that won the race
                raise
            log.info("another process finished %s first; using it", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)


# --- the build ---------------------------------------------------------------------------
def _build_into(out: Path, recipe: BaseModelRecipe, key: str, progress: bool) -> None:
    from sept_megatron.rollout.hf import HFRolloutEngine
    from sept_megatron.runtime import compat

    start = time.perf_counter()
    wall: dict[str, float] = {}
    splits = task_module.build_splits(recipe.seed, n_train=recipe.n_train)
    corpus = task_module.base_corpus(splits["train"], recipe.slip_rate, random.Random(recipe.seed))
    # Held-out examples for the export check (val problems; never test).
    held_out = task_module.base_corpus(splits["val"][:64], recipe.slip_rate, random.Random(recipe.seed + 1))
    texts = [text for example in corpus for text in (example.question, example.response)]
    tokenizer = tokenizer_module.train_tokenizer(texts, out, vocab_size=recipe.vocab_size)
    samples = [_sample(example, tokenizer) for example in corpus]
    held_out_samples = [_sample(example, tokenizer) for example in held_out]
    wall["data_and_tokenizer"] = time.perf_counter() - start

    hf_model = _random_hf_model(recipe, tokenizer)
    init_dir = out / "init"
    hf_model.save_pretrained(init_dir)
    with _world_of_one(recipe.seed):
        model = _megatron_from_hf(str(init_dir))
        shutil.rmtree(init_dir)
        trainer = _trainer(model, recipe, tokenizer.pad_token_id)
        t0 = time.perf_counter()
        curve, tokens = _pretrain(trainer, samples, recipe, progress)
        wall["train"] = time.perf_counter() - t0
        megatron_loss = trainer.evaluate_loss(held_out_samples)
        with compat.suspended():
            engine = HFRolloutEngine(model=hf_model, tokenizer=tokenizer, progress=False)
        sync_buckets = _sync(model, engine)
    with compat.suspended():
        hf_loss = _hf_response_nll(engine.model, held_out_samples, tokenizer.pad_token_id)
        if abs(hf_loss - megatron_loss) > 1e-3 * max(1.0, megatron_loss):
            raise RuntimeError(
                f"exported HF model disagrees with Megatron on held-out NLL: "
                f"{hf_loss:.6f} vs {megatron_loss:.6f}"
            )
        engine.model.save_pretrained(out)
    wall["total"] = time.perf_counter() - start

    n_params = sum(p.numel() for p in hf_model.parameters())
    _write_json(
        out / "recipe.json",
        {
            "recipe": asdict(recipe),
            "key": key,
            "build_version": BUILD_VERSION,
            "vocab_size": len(tokenizer),
            "n_params": n_params,
        },
    )
    _write_json(
        out / "train_log.json",
        {
            "loss": [round(x, 5) for x in curve["loss"]],
            "lr": curve["lr"],
            "grad_norm": [round(x, 4) for x in curve["grad_norm"]],
            "held_out_nll": {"megatron": megatron_loss, "hf": hf_loss},
            "tokens_per_s": tokens / wall["train"],
            "response_tokens": tokens,
            "sync_buckets": sync_buckets,
            "torch_threads": torch.get_num_threads(),
            # The bits depend on the CPU kernels' instruction set, not on the thread count (README).
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "wall_time_s": {k: round(v, 2) for k, v in wall.items()},
        },
    )
    (out / MARKER).write_text(key + "\n")
    log.info(
        "built base model %s (%d params) in %.0f s: loss %.3f -> %.3f",
        out.name,
        n_params,
        wall["total"],
        curve["loss"][0],
        curve["loss"][-1],
    )


def _sample(example, tokenizer):
    from sept_megatron.data import Question, render_prompt
    from sept_megatron.trainer.sft import Sample

    question = Question(
        prompt_messages=example.messages()[:1],
        question_text=example.question,
        ground_truth=None,
        source=task_module.DATA_SOURCE,
        index=0,
    )
    response = tokenizer.encode(example.response, add_special_tokens=False)
    return Sample(render_prompt(question, tokenizer, "auto"), response + [tokenizer.eos_token_id])


def _random_hf_model(recipe: BaseModelRecipe, tokenizer):
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[recipe.family]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.ffn_hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=recipe.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)  # HF's init draws from the global generator
    return model_class(config).float().eval()


@contextlib.contextmanager
def _world_of_one(seed: int) -> Iterator[None]:
    """A Megatron world of one for the build; tear down only what we created.

    The default group is created here with an in-memory store rather than by
    ``distributed.initialize``'s env:// rendezvous: a world of one needs no rendezvous, and
    binding MASTER_PORT would collide with other runs on the same machine.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sept_megatron.runtime import compat, distributed

    device = distributed.resolve_device("auto")
    if device == "cpu":
        compat.enable_cpu_megatron(force=True)
    made_group = not dist.is_initialized()
    if made_group:
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError(
            f"build_base_model runs in one process; this world has "
            f"{dist.get_world_size()} ranks: build the base model before launching"
        )
    made_parallel = not ps.model_parallel_is_initialized()
    if not made_parallel and (
        ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1
    ):
        raise RuntimeError("build_base_model needs TP = PP = 1; Megatron is initialised otherwise")
    try:
        distributed.initialize(tensor_parallel=1, pipeline_parallel=1, seed=seed, device=device)
        yield
    finally:
        if made_parallel:
            ps.destroy_model_parallel()
        if made_group:
            dist.destroy_process_group()


def _megatron_from_hf(hf_dir: str):
    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
    from sept_megatron.trainer import model as mdl

    arch = arch_from_hf_config(load_hf_config(hf_dir))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        arch,
        tensor_parallel=1,
        pipeline_parallel=1,
        params_dtype=torch.float32,
        transformer_impl="local",
        padded_vocab=padded,
    )
    reader = HFTensorReader(hf_dir)
    try:
        load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    finally:
        reader.close()
    return model


def _trainer(model, recipe: BaseModelRecipe, pad_id: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from sept_megatron.config import TrainConfig
    from sept_megatron.trainer.sft import SFTTrainer

    train_cfg = TrainConfig(
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        adam_beta2=recipe.adam_beta2,
        mini_batch_size=recipe.batch_size,
        micro_batch_size=recipe.batch_size,
        seed=recipe.seed,
    )
    trainer = SFTTrainer(
        model, train_cfg, total_steps=recipe.steps, use_distributed_optimizer=False, pad_id=pad_id
    )
    if recipe.lr_decay == "cosine":
        # Megatron's own scheduler, decaying after warmup instead of staying constant.
        trainer.scheduler = OptimizerParamScheduler(
            trainer.optimizer,
            init_lr=0.0,
            max_lr=recipe.lr,
            min_lr=recipe.lr * recipe.min_lr_ratio,
            lr_warmup_steps=recipe.warmup_steps,
            lr_decay_steps=max(recipe.steps, recipe.warmup_steps + 1),
            lr_decay_style="cosine",
            start_wd=recipe.weight_decay,
            end_wd=recipe.weight_decay,
            wd_incr_steps=recipe.steps,
            wd_incr_style="constant",
        )
    return trainer


def _batches(samples: Sequence, recipe: BaseModelRecipe) -> Iterator[list]:
    """``recipe.steps`` mini-batches, walking a fresh shuffle of the corpus every epoch.

    With ``length_group > 1``, each run of that many batches is drawn as one pool, sorted by
    length and cut in order, then the batches are shuffled: a batch is padded to its longest
    sequence, so grouping similar lengths cuts the padded tokens (compute) by about a fifth.
    """
    rng = random.Random(recipe.seed)
    size, group = recipe.batch_size, recipe.length_group
    order: list[int] = []
    produced = 0
    while produced < recipe.steps:
        count = min(group, recipe.steps - produced)
        while len(order) < count * size:
            epoch = list(range(len(samples)))
            rng.shuffle(epoch)
            order += epoch
        pool, order = order[: count * size], order[count * size :]
        if count > 1:
            pool.sort(key=lambda i: len(samples[i].prompt_ids) + len(samples[i].response_ids))
        batches = [pool[k * size : (k + 1) * size] for k in range(count)]
        rng.shuffle(batches)
        for batch in batches:
            yield [samples[i] for i in batch]
        produced += count


def _pretrain(trainer, samples, recipe: BaseModelRecipe, progress: bool) -> tuple[dict, float]:
    from tqdm.auto import tqdm

    curve: dict[str, list[float]] = {"loss": [], "lr": [], "grad_norm": []}
    tokens = 0.0
    bar = tqdm(total=recipe.steps, desc="base model pretraining", unit="step", disable=not progress)
    for batch in _batches(samples, recipe):
        logs = trainer.step(batch)
        curve["loss"].append(logs["train/loss"])
        curve["lr"].append(logs["train/lr"])
        curve["grad_norm"].append(logs["train/grad_norm"])
        tokens += sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['train/loss']:.3f}")
    bar.close()
    return curve, tokens


def _sync(model, engine) -> int:
    from sept_megatron import weight_sync

    return weight_sync.sync(model, engine, bucket_bytes=64 << 20)


@torch.no_grad()
def _hf_response_nll(hf_model, samples, pad_id: int) -> float:
    """Token-mean NLL of the responses (EOS included), the trainer's loss, under the HF model."""
    from sept_megatron.trainer.sft import make_micro_batch, padded_length

    batch = make_micro_batch(samples, padded_length(samples), pad_id)
    logits = hf_model(input_ids=batch.tokens).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
    return float((nll * batch.loss_mask).sum() / batch.loss_mask.sum())


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


# --- evaluation --------------------------------------------------------------------------
def quick_eval(
    hf_dir: str,
    problems: Sequence[task_module.Problem],
    temperature: float = 1.0,
    n: int = 8,
    seed: int = 0,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Greedy accuracy and pass@1 (and pass@8 when ``n >= 8``) at ``temperature``.

    For checking the base is imperfect, not for reporting: the demo's numbers come from the
    evaluation sweep. Runs without the CPU-Megatron redirect (plain PyTorch generation).
    """
    from sept_megatron.data import Question, render_prompt
    from sept_megatron.eval.grading import is_correct
    from sept_megatron.eval.metrics import pass_at_k
    from sept_megatron.rollout.base import SamplingParams
    from sept_megatron.rollout.hf import HFRolloutEngine
    from sept_megatron.runtime import compat

    with compat.suspended():
        engine = HFRolloutEngine(hf_dir, batch_size=batch_size, progress=progress)
        tokenizer = engine.tokenizer
        prompts = [
            render_prompt(
                Question(
                    [{"role": "user", "content": p.question}],
                    p.question,
                    p.answer,
                    task_module.DATA_SOURCE,
                    i,
                ),
                tokenizer,
                "auto",
            )
            for i, p in enumerate(problems)
        ]
        greedy = engine.generate(
            prompts, SamplingParams(temperature=0.0, n=1, max_new_tokens=max_new_tokens, seed=seed)
        )
        sampled = engine.generate(
            prompts, SamplingParams(temperature=temperature, n=n, max_new_tokens=max_new_tokens, seed=seed)
        )
    correct = [sum(is_correct(g.text, p.answer) for g in gens) for p, gens in zip(problems, sampled)]
    result = {
        "questions": len(problems),
        "temperature": temperature,
        "n": n,
        "greedy": sum(is_correct(g[0].text, p.answer) for p, g in zip(problems, greedy)) / len(problems),
        "pass@1": sum(pass_at_k(n, c, 1) for c in correct) / len(problems),
        "truncated": sum(g.finish_reason == "length" for gens in sampled for g in gens) / (n * len(problems)),
    }
    if n >= 8:
        result["pass@8"] = sum(pass_at_k(n, c, 8) for c in correct) / len(problems)
    return result
