"""Conversion acceptance checks, all families in one launch (for test_conversion_acceptance.py).

    torchrun --nproc-per-node=2 tests/convert/_worker.py MODELS_ROOT WORK_DIR   # TP=2, PP=2
    python tests/convert/_worker.py MODELS_ROOT WORK_DIR                          # TP=1

For every HF checkpoint under MODELS_ROOT and every layout of this world size, it runs the three
tools exactly as a user would (their ``main(argv)``, in this process, so the start-up cost is paid
once): HF -> Megatron, Megatron -> HF (sharded safetensors), and the logit check. Then it loads
the checkpoints written at TP=2 at the other layouts this world allows and saves the logits.
Rank 0 writes ``WORK_DIR/results-world{N}.json``; the tests assert on it and on the files.

Heavy imports sit inside the functions: dist_checkpointing's writer starts a helper process with
``spawn``, which re-imports this file, and should not pay for torch and megatron-core again.
"""

import contextlib
import functools
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITE_LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)]}
# Checkpoints written at TP=2 are loaded again at: (2, 1) itself as the reference, PP=2, and
# TP=1 in a world of one.
RELOAD_LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)]}
SMALL_SHARDS_GB = "0.00005"  # ~50 KB: the export is split over several safetensors files
OTHER_WEIGHTS = "llama3-other"  # as in hf_checkpoints.py (not imported: it imports torch)


@functools.cache
def tool(name: str):
    """A script of tools/ as a module, so its ``main(argv)`` runs in this process."""
    path = REPO_ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layout_name(tp: int, pp: int) -> str:
    return f"tp{tp}pp{pp}"


def run_check_logits(hf_dir: Path, ckpt: Path) -> dict:
    """tools/check_logits.py's exit code and the max difference it printed (rank 0)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = tool("check_logits").main(["--hf-dir", str(hf_dir), "--ckpt", str(ckpt)])
    match = re.search(r"max \|logit difference\| = (\S+)", stdout.getvalue())
    return {"rc": rc, "max_diff": float(match.group(1)) if match else None}


def convert_export_check(hf_dir: Path, work: Path, tp: int, pp: int) -> dict:
    import torch.distributed as dist

    ckpt = work / f"{hf_dir.name}-{layout_name(tp, pp)}"
    tool("convert_hf_to_megatron").main(
        ["--hf-dir", str(hf_dir), "--out", str(ckpt), "--tp", str(tp), "--pp", str(pp)]
    )
    if dist.get_rank() == 0:  # the export is single-process: it reads the checkpoint files
        tool("convert_megatron_to_hf").main(
            ["--ckpt", str(ckpt), "--out", f"{ckpt}-hf", "--max-shard-size-gb", SMALL_SHARDS_GB]
        )
    dist.barrier()
    return run_check_logits(hf_dir, ckpt)


def reload_logits(hf_dir: Path, ckpt: Path, tp: int, pp: int):
    """Logits of ``ckpt`` loaded at (tp, pp) (from the last stage) and its rotary frequencies."""
    import torch
    import torch.distributed as dist

    from sept_megatron.convert.workflows import forward_logits, load_megatron_checkpoint, probe_tokens
    from sept_megatron.runtime import distributed

    distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp)
    try:
        model = load_megatron_checkpoint(str(ckpt), tp=tp, pp=pp)
        for chunk in model.chunks:
            chunk.eval()
        tokens = probe_tokens(str(hf_dir), model.arch.vocab_size, 32)
        with torch.no_grad():
            logits = forward_logits(model, tokens)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, logits)  # PP: only the last stage has them
        rotary = model.chunks[0].rotary_pos_emb.inv_freq.detach().clone()
    finally:
        distributed.shutdown(keep_process_group=True)
    return next(x for x in everyone if x is not None), rotary


def main(models_root: str, work_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from sept_megatron.runtime import distributed

    root, work = Path(models_root), Path(work_dir)
    # The default group lives for the whole launch; each workflow creates Megatron's groups.
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)
    distributed.shutdown(keep_process_group=True)
    world, rank = dist.get_world_size(), dist.get_rank()
    models = sorted(d for d in root.iterdir() if d.name != OTHER_WEIGHTS)
    results: dict = {"check_logits": {}}

    for tp, pp in WRITE_LAYOUTS[world]:
        for hf_dir in models:
            results["check_logits"][f"{hf_dir.name}/{layout_name(tp, pp)}"] = convert_export_check(
                hf_dir, work, tp, pp
            )

    (work / "logits").mkdir(exist_ok=True)
    for tp, pp in RELOAD_LAYOUTS[world]:
        for hf_dir in models:
            logits, rotary = reload_logits(hf_dir, work / f"{hf_dir.name}-tp2pp1", tp, pp)
            if rank == 0:
                name = f"{hf_dir.name}-from-tp2pp1-at-{layout_name(tp, pp)}-world{world}"
                torch.save({"logits": logits, "inv_freq": rotary}, work / "logits" / f"{name}.pt")

    if world == 1:  # the negative check: another model's weights must fail the logit check
        results["negative"] = run_check_logits(root / OTHER_WEIGHTS, work / "llama3-tp1pp1")

    if rank == 0:
        (work / f"results-world{world}.json").write_text(json.dumps(results, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
