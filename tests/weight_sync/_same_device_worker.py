"""Same-device sync vs the bucket path, in one process (test_same_device.py).

    python tests/weight_sync/_same_device_worker.py HF_DIR OUT_PT

Megatron loads HF_DIR at TP = PP = 1, its weights are perturbed, and three engines started
from the unperturbed checkpoint receive them: by the same-device copy (fp32 and a bf16
engine) and by the bucket stream. Saves every engine's state dict and which path ``sync``
chose by itself.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker import engine_from, perturb_, state_of  # noqa: E402

from sept_megatron.convert import HFTensorReader, load_hf_into_model  # noqa: E402
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config  # noqa: E402
from sept_megatron.runtime import distributed  # noqa: E402
from sept_megatron.trainer import model as mdl  # noqa: E402
from sept_megatron.weight_sync import sync  # noqa: E402
from sept_megatron.weight_sync.same_device import can_sync_in_place, same_device_sync  # noqa: E402


def main(hf_dir: str, out: str) -> None:
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device="cpu")
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        arch, tensor_parallel=1, pipeline_parallel=1, padded_vocab=padded, transformer_impl="local"
    )
    reader = HFTensorReader(hf_dir)
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    reader.close()
    perturb_(model, seed=11)
    in_place, streamed = engine_from(Path(hf_dir)), engine_from(Path(hf_dir))
    half = engine_from(Path(hf_dir))
    half.model.to(torch.bfloat16)
    half.__dict__.pop("_targets", None)
    record = {
        "can": can_sync_in_place(model, in_place, "native"),
        "can_fp8": can_sync_in_place(model, in_place, "fp8"),
        "written": same_device_sync(model, in_place),
        "buckets": sync(model, streamed, bucket_bytes=64 << 10, direct=False),
    }
    same_device_sync(model, half)
    record |= {"in_place": state_of(in_place), "streamed": state_of(streamed), "half": state_of(half)}
    torch.save(record, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
