"""Time the weight sync (Megatron -> every rank's hf engine) against plain copies of its bytes.

    python tools/measure_sync.py --hidden 512 --layers 8 --tp 2 [--repeats 7] [--device cpu]

Builds a random-init Qwen2-shaped HF model (vocab 512, ``--heads`` heads (default hidden / 64),
2 KV heads, FFN ``--ffn`` (default 4 x hidden)), launches ``--tp`` ranks under torchrun (Megatron at TP=``--tp``), and times:

- ``sync_all_s``: :func:`sept_megatron.weight_sync.sync` with an engine on every rank
  (what the SePT loop does);
- ``sync_rank0_s``: the same with an engine on rank 0 only (others only send);
- ``copy_s``: one same-device copy of the model's bytes into a preallocated buffer;
- ``engine_load_s``: the engine loading the same HF tensors from same-device copies (the
  receiving side alone).

Medians of ``--repeats`` runs after one warm-up, each started by a barrier; ratios are
``copy_s / sync_s`` (1.0 = the sync costs one plain copy). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden / 64")
    parser.add_argument("--ffn", type=int, default=None, help="default: 4 x hidden")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--worker", metavar="HF_DIR", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.heads = args.heads or max(1, args.hidden // 64)
    args.ffn = args.ffn or 4 * args.hidden
    if args.hidden % args.heads or args.heads % args.tp or 2 % args.tp or args.heads % 2:
        parser.error(
            "--heads must divide --hidden and be even, and --tp must divide the heads and the 2 KV heads"
        )
    return args


def make_model(args: argparse.Namespace, out: Path) -> None:
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=2,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).float().save_pretrained(out)


def median_seconds(fn, repeats: int) -> float:
    import torch.distributed as dist

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
    from sept_megatron.runtime import distributed
    from sept_megatron.trainer import model as mdl
    from sept_megatron.weight_sync import sync
    from sept_megatron.weight_sync.plan import sync_plan

    distributed.initialize(tensor_parallel=args.tp, pipeline_parallel=1, device=args.device)
    device = distributed.compute_device()
    hf_dir = args.worker
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, args.tp)
    model = mdl.build_megatron_model(
        arch, tensor_parallel=args.tp, pipeline_parallel=1, padded_vocab=padded, transformer_impl="local"
    )
    reader = HFTensorReader(hf_dir)
    load_hf_into_model(
        model.chunks,
        reader,
        arch,
        padded_vocab=padded,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=args.tp,
    )
    reader.close()
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    engine = _engine(hf_model, device)
    bucket = args.bucket_mb << 20
    rank0_engine = engine if dist.get_rank() == 0 else None
    result = {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "ffn": args.ffn,
        "tp": args.tp,
        "device": str(device),
        "sync_all_s": median_seconds(lambda: sync(model, engine, bucket_bytes=bucket), args.repeats),
        "sync_rank0_s": median_seconds(lambda: sync(model, rank0_engine, bucket_bytes=bucket), args.repeats),
    }
    nbytes = sum(item.numel for item in sync_plan(arch, 1)) * 4
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    names = {name for item in sync_plan(arch, 1) for name in item.hf_names}
    tensors = [(name, t.detach().clone()) for name, t in engine._named_tensors().items() if name in names]
    result |= {
        "bytes": nbytes,
        "copy_s": median_seconds(lambda: dst.copy_(src), args.repeats),
        "engine_load_s": median_seconds(lambda: engine.update_weights([tensors]), args.repeats),
    }
    for key in ("sync_all", "sync_rank0"):
        result[f"ratio_{key}_to_copy"] = result["copy_s"] / result[f"{key}_s"]
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    distributed.shutdown()


def _engine(hf_model, device):
    from sept_megatron.rollout.hf import HFRolloutEngine

    class _NoTokenizer:  # the sync needs no tokenizer
        eos_token_id, pad_token_id, bos_token_id = 0, 0, None

        def __len__(self):
            return 1

    return HFRolloutEngine(model=hf_model, tokenizer=_NoTokenizer(), device=device, progress=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "model"
        make_model(args, hf_dir)
        from sept_megatron.runtime.distributed import free_port

        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={args.tp}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            str(Path(__file__).resolve()),
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--tp",
            str(args.tp),
            "--heads",
            str(args.heads),
            "--ffn",
            str(args.ffn),
            "--repeats",
            str(args.repeats),
            "--bucket-mb",
            str(args.bucket_mb),
            "--device",
            args.device,
            "--worker",
            str(hf_dir),
        ]
        env = dict(
            os.environ, SEPT_DEVICE=args.device, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
        )
        return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
