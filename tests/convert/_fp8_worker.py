"""FP8 export and FP8 weight sync of the same checkpoints, in one launch (test_fp8_export.py).

    python tests/convert/_fp8_worker.py WORK_DIR NAME=HF_DIR:DTYPE [NAME=HF_DIR:DTYPE ...]

For each model: ``tools/convert_hf_to_megatron.py --dtype DTYPE`` (TP=1) -> ``WORK/NAME-ckpt``;
``tools/convert_megatron_to_hf.py --fp8 blockwise`` with small shards -> ``WORK/NAME-fp8``
(both through the tools' ``main(argv)``, as a user runs them); then the Megatron model loaded
from that checkpoint pushes its weights through ``weight_sync.sync(weights="fp8")`` into a
recording engine. The streamed tensors go to ``WORK/NAME-sync.safetensors`` and their order and
bucket count to ``WORK/NAME-sync.json``.
"""

import json
import sys
from pathlib import Path

from _worker import SMALL_SHARDS_GB, tool  # this directory is sys.path[0] for a script

BUCKET_BYTES = 16 * 1024  # several buckets per model


class RecordingEngine:
    """What the sync hands an engine: the HF-named buckets, kept as they arrive."""

    def __init__(self):
        self.buckets: list[list[tuple[str, object]]] = []

    def update_weights(self, buckets) -> None:
        for bucket in buckets:
            self.buckets.append([(name, tensor.clone()) for name, tensor in bucket])


def sync_fp8(ckpt: Path) -> RecordingEngine:
    from sept_megatron.convert.workflows import load_megatron_checkpoint
    from sept_megatron.runtime import distributed
    from sept_megatron.weight_sync import sync

    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)
    try:
        model = load_megatron_checkpoint(str(ckpt), tp=1, pp=1)
        engine = RecordingEngine()
        sent = sync(model, engine, bucket_bytes=BUCKET_BYTES, weights="fp8")
        assert sent == len(engine.buckets)
    finally:
        distributed.shutdown(keep_process_group=True)
    return engine


def main(work_dir: str, *specs: str) -> None:
    from safetensors.torch import save_file

    from sept_megatron.runtime import distributed

    work = Path(work_dir)
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)  # the launch's default group
    distributed.shutdown(keep_process_group=True)
    for spec in specs:
        name, rest = spec.split("=", 1)
        hf_dir, dtype = rest.rsplit(":", 1)
        ckpt = work / f"{name}-ckpt"
        tool("convert_hf_to_megatron").main(["--hf-dir", hf_dir, "--out", str(ckpt), "--dtype", dtype])
        tool("convert_megatron_to_hf").main(
            [
                "--ckpt",
                str(ckpt),
                "--out",
                str(work / f"{name}-fp8"),
                "--max-shard-size-gb",
                SMALL_SHARDS_GB,
                "--fp8",
                "blockwise",
            ]
        )
        engine = sync_fp8(ckpt)
        stream = [(n, t.contiguous()) for bucket in engine.buckets for n, t in bucket]
        save_file(dict(stream), str(work / f"{name}-sync.safetensors"))
        (work / f"{name}-sync.json").write_text(
            json.dumps({"order": [n for n, _ in stream], "buckets": len(engine.buckets)})
        )
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
