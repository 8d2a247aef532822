"""``sept-megatron bench``: our code paths against the plain way of doing the same work,
measured side by side in one run. One JSON line per benchmark on stdout; progress on stderr.

    sept-megatron bench --shape tiny                        # CPU: all five benchmarks
    sept-megatron bench --shape 1.5b --only train,engine    # one GPU: the 1.31B Qwen2 shape
    python tools/bench.py --shape tiny --only sync --repeats 5

Benchmarks (``--only`` selects; they always run in this order):

- ``train``: :class:`~sept_megatron.trainer.sft.SFTTrainer` steps (the real Megatron path: schedule,
  DDP, optimizer, clipping) vs a plain transformers step (SDPA attention, AdamW, fused on CUDA,
  clipping) on the same weights, micro-batch, sequence length and dtype, one micro-batch per
  optimizer step on both sides. FLOPs per token: ``6 N + 12 L H Dh S`` (PaLM, appendix B: N
  parameters with tied embeddings counted once, L layers, H query heads of Dh channels, S the
  sequence length; the attention term counts the full S x S score matrix, causal masking not
  discounted). On GPU also the largest micro-batch that fits (doubling, then bisection,
  catching OOM) and, with Transformer Engine, FP8 (delayed / tensorwise / blockwise) vs BF16.
- ``engine``: :class:`~sept_megatron.rollout.hf.HFRolloutEngine` ``generate`` vs calling
  ``model.generate`` directly on the same model, batch, sampling settings and seed. The engine
  samples each sequence from its own seeded generator (so rollouts do not depend on how they
  are spread over engines) where plain ``generate`` draws from torch's global RNG, so sampled
  tokens differ by design; ``same_tokens`` checks one untimed greedy call of each instead.
- ``sync``: :func:`~sept_megatron.weight_sync.sync` into a real engine at TP=``--sync-tp``
  vs one same-device copy of the same number of bytes (``ratio_to_copy`` = copy time / sync
  time). With TP > 1 the bench launches itself under ``torchrun --nproc-per-node=TP`` (gloo on
  CPU, NCCL on GPUs); run the bench itself as a plain process. ``ratio_to_tensor_copy``
  compares with the engine loading the same tensors from same-device copies (the receiving
  side alone); ``profile`` shows where rank 0's time goes (cProfile of one extra sync).
  ``path``: ``direct`` where the engine's weights live in the ranks' shared buffer (CPU, see
  :mod:`~sept_megatron.weight_sync.direct`), else ``buckets``; ``bucket_sync_s`` times
  the bucket stream on the same ranks side by side; ``barrier_s`` is one barrier of the ranks
  (the floor of any sync that must wait for all of them). Every timed call starts after an
  untimed barrier.
- ``checkpoint``: seconds one training checkpoint blocks training, foreground save vs
  ``checkpoint.async_save`` (:class:`~sept_megatron.trainer.checkpoint.CheckpointSaver`).
- ``round``: real SePT rounds through :func:`sept_megatron.loop.driver.run` (a checkpoint every
  round, in the background with ``--async-checkpoint true``); the seconds of generate / train / sync / checkpoint per round and ``other_share``,
  the share of the round's wall time that is none of those (see :func:`round_shares`).

Every time reported is the best of its timed calls (:func:`best`); ratios divide such times
taken in the same run, interleaved call by call where both sides fit in memory together.

Shapes: ``tiny`` (CPU; a random-init Qwen2, hidden 128, 4 layers, the demo tokenizer),
``small`` (CPU; hidden 512, 8 layers, 8 / 2 heads, FFN 2048: 31M parameters, 124 MB in fp32,
where a sync is bound by bytes rather than by latency) and ``1.5b`` (one GPU; hidden 1536, 28
layers, 12 heads / 2 KV heads, FFN 8960, tied embeddings, vocab 1024: 1.31B parameters). Weights are random: speed does not depend on them. Every flag is
checked before any model is built; a bad one exits with code 2 and names the fix.

Layout: ``options`` (shapes, flags), ``common`` (inputs, FLOPs, timing side by side), one module
per benchmark (``train``, ``engine``, ``sync``, ``checkpoint``, ``rounds``) and ``driver``
(``main``; ``python -m sept_megatron.bench`` also runs the torchrun sync workers).
"""

from sept_megatron.bench.common import best, flops_per_token, parameter_count, side_by_side
from sept_megatron.bench.driver import main, run_benchmarks
from sept_megatron.bench.options import (
    BENCHMARKS,
    SHAPES,
    BenchError,
    BenchOptions,
    Shape,
    build_parser,
    parse_options,
)
from sept_megatron.bench.rounds import PHASES, round_shares
from sept_megatron.bench.train import largest_fitting

__all__ = [
    "BENCHMARKS",
    "PHASES",
    "SHAPES",
    "BenchError",
    "BenchOptions",
    "Shape",
    "best",
    "build_parser",
    "flops_per_token",
    "largest_fitting",
    "main",
    "parameter_count",
    "parse_options",
    "round_shares",
    "run_benchmarks",
    "side_by_side",
]
