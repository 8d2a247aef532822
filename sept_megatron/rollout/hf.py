"""The transformers rollout backend: batched ``model.generate`` with a KV cache.

It is the CPU/test backend and the reference the SGLang backend is checked against, so it
favours being obviously right over being fast: plain left-padded batches, no continuous
batching. Data path of a weight sync: full HF-named tensors (from the trainer's export) are
copied in place into the model's parameters, so the engine never reloads from disk; or, colocated
on CPU, the parameters are views into the trainer ranks' shared buffer (:meth:`bind_weights`)
and the trainer writes into them directly.

Sampling is ours, not ``generate``'s: every sequence draws from its own generator (seeded by
:func:`~sept_megatron.rollout.base.sequence_seed`), and ``generate`` runs in greedy mode over
scores that leave only the drawn token. So a sample does not depend on its row in the batch
or on the RNG the other rows consumed: with the same batches (``shard_sequences``), prompts
spread over several engines give the samples one engine gives.
"""

from __future__ import annotations

import functools
import logging
import math
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sept_megatron.data import load_tokenizer
from sept_megatron.rollout.base import (
    Generation,
    SamplingParams,
    WeightBucket,
    check_prompts,
    sequence_seeds,
    stop_ids,
)
from sept_megatron.rollout.hf_memory import HFMemory

logger = logging.getLogger(__name__)

STATIC_CACHE_STEP = 256
"""Static KV cache lengths are multiples of this (fewer distinct shapes to compile)."""


class HFRolloutEngine:
    """A :class:`~sept_megatron.rollout.base.RolloutEngine` over a transformers causal LM.

    Build it from a local HF directory (``model_path``; never a hub name: nothing is
    downloaded) or from a ``model`` and ``tokenizer`` already in memory.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        progress: bool = True,
        group=None,
        process_group=None,
        static_cache: bool = False,
    ) -> None:
        # One engine per rank: ``group`` (an EngineGroup from the placement) must be this rank
        # alone; the one-rank process group has nothing to coordinate.
        del process_group
        if group is not None and len(group.ranks) != 1:
            raise ValueError(
                f"the hf backend runs one engine per rank, got an engine group of "
                f"ranks {group.ranks}; set rollout.engine_tp=1"
            )
        if (model_path is None) == (model is None):
            raise ValueError("HFRolloutEngine needs exactly one of model_path or model")
        if model_path is not None:
            if not Path(model_path).is_dir():
                raise ValueError(f"model_path must be a local HF model directory, got {model_path!r}")
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
            tokenizer = tokenizer or load_tokenizer(model_path)
        if tokenizer is None:
            raise ValueError("HFRolloutEngine(model=...) also needs tokenizer=...")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.progress = progress
        self.tokenizer = tokenizer
        self.shard_sequences = batch_size  # rollout shards are cut in whole batches
        self.static_cache = static_cache  # rollout.hf_static_cache; see _call_config
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.loaded_tensor_count = 0  # tensors the last update_weights loaded
        self._bound: list[torch.nn.Parameter] = []  # parameters that are views (bind_weights)
        self._released = False
        self._set_generation_config()

    # --- the RolloutBackend class methods (rollout.backend=hf) ------------------------------
    @classmethod
    def check_config(cls, rollout, *, arch=None) -> list[str]:
        del arch  # any model transformers loads
        problems = []
        if rollout.engine_tp != 1:
            problems.append(
                f"rollout.engine_tp={rollout.engine_tp}: the hf backend runs one engine "
                "per device; set rollout.engine_tp=1 or rollout.backend=sglang"
            )
        if rollout.placement != "colocated":
            problems.append(
                f"rollout.placement={rollout.placement}: the hf backend runs inside "
                "the trainer's ranks; set rollout.placement=colocated (SGLang servers "
                "of their own: rollout.backend=sglang with rollout.server_urls)"
            )
        if rollout.weights == "fp8":
            # transformers keeps FP8 weights only on a GPU (compute capability >= 8.9) and
            # dequantises an FP8 checkpoint to bf16 at load on CPU, so the hf engine would only
            # ever hold dequantised copies: refuse rather than pretend.
            problems.append(
                "rollout.weights=fp8 needs rollout.backend=sglang (an SGLang engine "
                "started from an FP8 config holds e4m3 weights); the hf engine keeps "
                "the training dtype: set rollout.weights=native or rollout.backend=sglang"
            )
        return problems

    @classmethod
    def prepare_process(cls, rollout) -> None:
        """Nothing process-wide: the engine is plain PyTorch in this process."""

    @classmethod
    def config_kwargs(
        cls,
        rollout,
        *,
        tokenizer,
        seed: int,
        device: str,
        dtype,
        progress: bool,
        placement=None,
        run_dir: str | None = None,
    ) -> dict:
        """The hf engine runs on ``device`` in ``dtype`` (the trainer's), in batches of
        ``rollout.batch_size`` sequences."""
        del tokenizer, seed, run_dir  # it loads its own; sampling seeds come with each call
        kwargs = dict(
            device=device,
            dtype=dtype,
            batch_size=rollout.batch_size,
            progress=progress,
            static_cache=rollout.hf_static_cache,
        )
        if placement is not None:
            kwargs |= dict(group=placement.mine, process_group=placement.process_group)
        return kwargs

    @classmethod
    def build(cls, model_path: str | None = None, **kwargs) -> HFRolloutEngine:
        return cls(model_path, **kwargs)

    @classmethod
    def memory_model(cls) -> HFMemory:
        """A full bf16 copy per GPU, its batch's KV cache and prefill (:mod:`.hf_memory`)."""
        return HFMemory()

    # --- generation --------------------------------------------------------------------

    def _set_generation_config(self) -> None:
        """Own the model's generation config so only :class:`SamplingParams` steer sampling.

        A checkpoint's ``generation_config.json`` (Qwen ships top_k=20, repetition_penalty
        1.05, ...) would otherwise fill every field a call leaves unset. We keep only its
        special ids: EOS is the union of the tokenizer's EOS and the checkpoint's EOS list
        (instruct models end turns with ``<|im_end|>`` but may also emit ``<|endoftext|>``).
        Pad falls back to EOS for tokenizers without one; it only ever fills positions after
        EOS (or left padding), so the choice does not change any output.
        """
        old = getattr(self.model, "generation_config", None)
        eos_ids = stop_ids(self.tokenizer, getattr(old, "eos_token_id", None))
        pad_id = self.tokenizer.pad_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)
        self.pad_token_id: int = pad_id if pad_id is not None else eos_ids[0]
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
        )

    def _call_config(self, sampling: SamplingParams, prompt_width: int) -> GenerationConfig:
        """Per-call config: always greedy; sampling, when asked for, is :class:`_SeededSampler`.

        With ``static_cache`` the KV cache is transformers' ``StaticCache``: preallocated, so
        the decoding step has fixed shapes, and on CUDA ``generate`` then runs that step through
        ``torch.compile`` with its default ``CompileConfig`` (inductor,
        ``mode="reduce-overhead"``), i.e. CUDA graphs: one replay per token
        instead of hundreds of kernel launches from Python (transformers'
        ``_valid_auto_compile_criteria``; it never compiles on the CPU). The cache length is
        rounded up to a multiple of :data:`STATIC_CACHE_STEP`, and transformers keeps the
        largest length it has seen, so later calls with other prompt widths reuse the cache and
        the compiled graphs (a new batch size, e.g. a last partial chunk, records new graphs).
        """
        static = {}
        if self.static_cache:
            needed = prompt_width + sampling.max_new_tokens
            static = dict(
                cache_implementation="static",
                max_cache_len=-(-needed // STATIC_CACHE_STEP) * STATIC_CACHE_STEP,
            )
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            num_beams=1,
            use_cache=True,
            **static,
        )

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Generation]]:
        """Return ``sampling.n`` generations per prompt, in prompt order.

        Sequences are sorted by prompt length (longest first, so an out-of-memory shows up
        on the first chunk) and generated ``batch_size`` at a time. Greedy decoding runs each
        prompt once and copies the result ``n`` times. Sampling draws each sequence from its
        own generator: seeded from ``sampling.seed`` and the prompt's seed key when a seed is
        given (the same sequence, prompt, weights and batch give the same sample, and torch's
        global RNG is left untouched), else from torch's global RNG.
        """
        sampling.check()
        if self._released:
            raise RuntimeError("HFRolloutEngine.generate after release_memory(); call resume_memory() first")
        check_prompts(prompts)
        greedy = sampling.temperature == 0
        copies = 1 if greedy else sampling.n
        seeds = None if greedy else _row_seeds(sampling, len(prompts))
        jobs = [(index, copy) for index in range(len(prompts)) for copy in range(copies)]
        jobs.sort(key=lambda job: -len(prompts[job[0]]))  # stable: ties keep prompt order
        chunks = [jobs[start : start + self.batch_size] for start in range(0, len(jobs), self.batch_size)]

        results: list[list[Generation | None]] = [[None] * copies for _ in prompts]
        for chunk in tqdm(chunks, desc="rollout", unit="batch", disable=not self.progress, leave=False):
            chunk_prompts = [prompts[index] for index, _ in chunk]
            width = max(map(len, chunk_prompts))  # the left-padded prompt width of this chunk
            sampler = (
                None
                if seeds is None
                else _SeededSampler(
                    [seeds[index][copy] for index, copy in chunk], sampling, width, self.device
                )
            )
            config = self._call_config(sampling, width)
            outputs = self._generate_batch(chunk_prompts, config, sampler)
            for (index, copy), generation in zip(chunk, outputs):
                results[index][copy] = generation
        if copies == sampling.n:
            return results  # type: ignore[return-value]
        return [[_copy(row[0]) for _ in range(sampling.n)] for row in results]  # type: ignore[arg-type]

    def _generate_batch(
        self, prompts: list[Sequence[int]], config: GenerationConfig, sampler: _SeededSampler | None
    ) -> list[Generation]:
        """Left-pad one chunk, generate, and cut each response after its first EOS."""
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        stats = _TokenStats()  # first: it must see the model's raw logits
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([stats] + ([sampler] if sampler is not None else [])),
        )
        new_tokens = output[:, width:]
        logprobs, entropies = stats.finish(new_tokens)
        return [
            self._to_generation(row, row_logprobs, row_entropies)
            for row, row_logprobs, row_entropies in zip(new_tokens.tolist(), logprobs, entropies)
        ]

    def _to_generation(
        self, new_tokens: list[int], logprobs: Sequence[float], entropies: Sequence[float]
    ) -> Generation:
        """Cut after the first EOS. Padding only ever follows EOS (a batch runs until every
        row has stopped or hit the limit), so the cut also strips it; a row without EOS
        used its whole ``max_new_tokens`` budget."""
        stop = next((pos for pos, token in enumerate(new_tokens) if token in self.eos_token_ids), None)
        token_ids = new_tokens if stop is None else new_tokens[: stop + 1]
        return Generation(
            token_ids=token_ids,
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            finish_reason="length" if stop is None else "stop",
            logprobs=array("f", logprobs[: len(token_ids)]),
            entropies=array("f", entropies[: len(token_ids)]),
        )

    # --- weights -----------------------------------------------------------------------

    @functools.cached_property
    def _targets(self) -> dict[str, torch.Tensor]:
        """:meth:`_named_tensors`, looked up once per placement of the model (``Module.to``
        keeps parameters but replaces buffers, so release/resume forget it)."""
        return self._named_tensors()

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        """Every loadable name: parameters, tied aliases included (``lm_head.weight`` and
        ``model.embed_tokens.weight`` name the same tensor when tied), then buffers."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        for name, buffer in self.model.named_buffers(remove_duplicate=False):
            named.setdefault(name, buffer)
        return named

    def update_weights(self, buckets: Iterable[WeightBucket], *, strict: bool = False) -> int:
        """Copy HF-named tensors into the model in place; return how many were loaded.

        Tensors are cast to each target's dtype (the engine's ``dtype``) and moved to its
        device. An unknown name or a shape mismatch raises ``ValueError`` naming the tensor
        (the parameters loaded before it keep their new values: a failed sync is fatal).
        With ``strict=True`` the call must be a full sync: every parameter must have been
        written (either name of a tied pair counts), else ``ValueError`` lists the missing.
        """
        written: set[int] = set()
        count = 0
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket:
                    target = self._target(name, tensor.shape, "update_weights")
                    if tensor.device != target.device or tensor.dtype != target.dtype:
                        tensor = tensor.to(device=target.device, dtype=target.dtype)
                    target.copy_(tensor)
                    written.add(id(target))
                    count += 1
        if strict:
            missing = [name for name, param in self.model.named_parameters() if id(param) not in written]
            if missing:
                raise ValueError(
                    f"update_weights(strict=True): {len(missing)} parameters not sent: {missing[:8]}"
                )
        self.loaded_tensor_count = count
        logger.debug("update_weights: loaded %d tensors", count)
        return count

    def _target(self, name: str, shape, caller: str) -> torch.Tensor:
        """The parameter or buffer called ``name``; a clear error if there is none of that shape."""
        target = self._targets.get(name)
        if target is None:
            raise ValueError(
                f"{caller}: unknown tensor {name!r}: not a parameter or buffer of {type(self.model).__name__}"
            )
        if tuple(target.shape) != tuple(shape):
            raise ValueError(
                f"{caller}: shape mismatch for {name!r}: got {tuple(shape)}, model has {tuple(target.shape)}"
            )
        return target

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors by HF name, to be written in place (InPlaceWeightEngine)."""
        if self._released:
            raise RuntimeError("weight_tensors(): the engine's memory is released; resume it first")
        return self._targets

    def can_bind_weights(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`bind_weights` can take tensors of ``dtype`` (host memory, our dtype)."""
        return self.device.type == "cpu" and self.dtype == dtype and not self._released

    def bind_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Make the named parameters views of the given tensors (same shape, dtype, device):
        whatever is written into those tensors afterwards is this engine's weights, with no
        copy (:mod:`~sept_megatron.weight_sync.direct`). Values are not copied: the
        caller fills the tensors. Tied names bind once. Returns the number of tensors bound."""
        pairs = list(named)
        for name, tensor in pairs:  # check everything before touching anything
            target = self._target(name, tensor.shape, "bind_weights")
            if (
                not isinstance(target, torch.nn.Parameter)
                or tensor.dtype != target.dtype
                or tensor.device != target.device
            ):
                raise ValueError(
                    f"bind_weights: {name!r} must be a parameter of dtype "
                    f"{target.dtype} on {target.device}, got {tensor.dtype} on "
                    f"{tensor.device}"
                )
        self.unbind_weights()
        with torch.no_grad():
            for name, tensor in pairs:
                param = self._targets[name]
                param.data = tensor
                self._bound.append(param)
        return len(pairs)

    def unbind_weights(self) -> None:
        """Give every bound parameter private memory again, keeping its current values."""
        with torch.no_grad():
            for param in self._bound:
                param.data = param.data.clone()
        self._bound = []

    # --- memory ------------------------------------------------------------------------

    def release_memory(self) -> None:
        """On CUDA, park the model in host memory and free the cache; no-op on CPU."""
        if self.device.type == "cuda" and not self._released:
            self.model.to("cpu")
            self.__dict__.pop("_targets", None)
            torch.cuda.empty_cache()
            self._released = True

    def resume_memory(self) -> None:
        """Move the model back to the accelerator before the next generation."""
        if self._released:
            self.model.to(self.device)
            self.__dict__.pop("_targets", None)
            self._released = False


def _row_seeds(sampling: SamplingParams, num_prompts: int) -> list[list[int]]:
    """Seeds of every (prompt, copy); an unseeded call takes them from torch's global RNG."""
    seeds = sequence_seeds(sampling, num_prompts)
    if seeds is not None:
        return seeds
    return torch.randint(0, 2**62, (num_prompts, sampling.n)).tolist()


class _SeededSampler(LogitsProcessor):
    """Draws the next token of every row from that row's own generator.

    Applied last, with ``generate`` in greedy mode: the scores are warped exactly as
    transformers' sampling would (temperature, then top-k, then top-p; its own warper classes),
    one uniform number per row and step is taken from the row's CPU generator and inverted
    through the row's CDF (float64), and the returned scores leave only that token finite, so
    greedy selection picks it. A row consumes one number per step whatever the other rows do.

    All of a row's numbers are drawn when the chunk starts, ``max_new_tokens`` at once: a CPU
    generator yields the same stream in one call as in one call per step (mt19937, filled
    serially), so the samples are the ones a per-step draw gives, and a step costs no Python
    loop over the rows and no host-to-device copy (which would block on the GPU every step).
    """

    def __init__(
        self, seeds: list[int], sampling: SamplingParams, prompt_width: int, device: torch.device
    ) -> None:
        self.draws = torch.stack(
            [
                torch.rand(
                    sampling.max_new_tokens,
                    generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64,
                )
                for seed in seeds
            ]
        ).to(device)  # (rows, steps)
        self.prompt_width = prompt_width  # new tokens so far = input width - prompt width
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
        if sampling.top_k != -1:
            self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = self.warpers(input_ids, scores).softmax(dim=-1, dtype=torch.float64)
        cdf = probs.cumsum(dim=-1)
        step = input_ids.shape[-1] - self.prompt_width
        totals = cdf[:, -1:].contiguous()
        targets = self.draws[:, step, None] * totals
        tokens = torch.searchsorted(cdf, targets, right=True)
        # u * total can round up to total: take the token where the CDF reaches its total.
        tokens = torch.minimum(tokens, torch.searchsorted(cdf, totals, right=False))
        chosen = torch.full_like(scores, -math.inf)
        return chosen.scatter_(1, tokens, 0.0)


class _TokenStats(LogitsProcessor):
    """Records, at every step, the entropy of the model's own next-token distribution (the raw
    logits, T = 1) and, one step later, the log-probability of the token that was chosen.

    It runs first in the processor list, before any sampling warper, and leaves the scores
    unchanged. Only the last step's log-softmax is kept ([batch, vocab]), so memory does not
    grow with the answer length; :meth:`finish` reads the last chosen tokens from the output.
    """

    def __init__(self) -> None:
        self._entropies: list[torch.Tensor] = []
        self._logprobs: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self._logprobs.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = torch.log_softmax(scores.float(), dim=-1)
        # entr(p) = -p log p, 0 at p = 0 (tokens masked to -inf add nothing, not NaN).
        self._entropies.append(torch.special.entr(self._last.exp()).sum(dim=-1))
        return scores

    def finish(self, new_tokens: torch.Tensor) -> tuple[list[list[float]], list[list[float]]]:
        """Per row, one value per generated position (padding after EOS included; the caller
        cuts at EOS)."""
        if self._last is None:
            return [[] for _ in range(new_tokens.shape[0])], [[] for _ in range(new_tokens.shape[0])]
        last_step = len(self._entropies) - 1
        self._logprobs.append(self._last.gather(1, new_tokens[:, last_step : last_step + 1]).squeeze(1))
        logprobs = torch.stack(self._logprobs, dim=1).cpu().tolist()
        entropies = torch.stack(self._entropies, dim=1).cpu().tolist()
        return logprobs, entropies


def _copy(generation: Generation) -> Generation:
    """An independent copy, so callers may edit one sample without touching its siblings."""
    return Generation(
        token_ids=list(generation.token_ids),
        text=generation.text,
        finish_reason=generation.finish_reason,
        logprobs=None if generation.logprobs is None else array("f", generation.logprobs),
        entropies=None if generation.entropies is None else array("f", generation.entropies),
    )
