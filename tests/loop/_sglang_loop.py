"""`sept-megatron train` with rollout.backend=sglang under torchrun, SGLang's side recorded
(run by tests/loop/test_sglang_loop.py).

    torchrun --nproc-per-node=2 tests/loop/_sglang_loop.py OUT_JSON key=value ...

Starting a real ``sglang.Engine`` needs CUDA and SGLang's kernels, so ``sglang.Engine`` is the
one thing replaced: ``import_sglang`` hands the backend a namespace whose ``Engine(**kwargs)``
first builds SGLang's real ``ServerArgs`` from the same kwargs (unknown names or bad values
fail there), then returns a :class:`RecordingEngine` (tests/rollout/sglang_recorder.py: every
call bound to the installed ``sglang.Engine`` method's signature, the weight-update session
rule enforced, each payload unpacked by SGLang's own receiving code). Everything else, the
loop, placement, orchestration, reshard and our SGLang backend, runs unchanged. Each rank
writes ``OUT_JSON.rank<r>``: the engines it started, their calls, and the tensors the last
sync loaded (raw bytes, hex), and the temperatures each generate call's requests carry.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
from sglang_recorder import RecordingEngine, as_bytes  # noqa: E402
from sglang_source import sglang_definitions  # noqa: E402

from sept_megatron import cli  # noqa: E402
from sept_megatron.rollout import sglang_engine  # noqa: E402

started: list[tuple[dict, RecordingEngine]] = []
# CPU payloads travel between the group's processes as shared-memory files (on GPUs: CUDA-IPC
# handles); the default fd-passing strategy needs a connection between unrelated processes.
torch.multiprocessing.set_sharing_strategy("file_system")


def answers(eos: int):
    finish = sglang_definitions(
        "srt/managers/schedule_batch.py", ["BaseFinishReason", "FINISH_MATCHED_TOKEN"], {}
    )

    def outputs(input_ids, sampling_params):
        # A short answer that depends on the prompt and the request's sampling seed.
        return [
            {
                "output_ids": [ids[-1], 3 + params["sampling_seed"] % 5, eos],
                "meta_info": {"id": str(j), "finish_reason": finish["FINISH_MATCHED_TOKEN"](eos).to_json()},
            }
            for j, (ids, params) in enumerate(zip(input_ids, sampling_params))
        ]

    return outputs


def engine_factory(eos: int):
    def Engine(**kwargs):
        from sglang.srt.server_args import ServerArgs

        ServerArgs(**kwargs)  # SGLang's own check of what sglang.Engine would be started with
        recorder = RecordingEngine(tp_size=kwargs["tp_size"], outputs=answers(eos))
        started.append((kwargs, recorder))
        return recorder

    return Engine


def main(out_path: str, *overrides: str) -> None:
    hf_path = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.hf_path="))
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(hf_path).eos_token_id
    sglang_engine.check_sglang_version()  # the real pin check still runs
    sglang_engine.import_sglang = lambda: SimpleNamespace(Engine=engine_factory(eos))
    rc = cli.main(["train", *overrides])
    rank = int(os.environ.get("RANK", "0"))  # the CLI has torn the process group down
    record = {
        "rc": rc,
        "engines": [
            {
                "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))},
                "calls": [
                    [name, {k: v for k, v in args.items() if k in ("tags", "load_format", "flush_cache")}]
                    for name, args in recorder.calls
                ],
                "payloads_per_update": sorted(
                    {
                        len(args["named_tensors"])
                        for name, args in recorder.calls
                        if name == "update_weights_from_tensor"
                    }
                ),
                "generated_prompts": sum(
                    len(args["input_ids"]) for name, args in recorder.calls if name == "generate"
                ),
                "temperatures": [
                    sorted({p["temperature"] for p in args["sampling_params"]})
                    for name, args in recorder.calls
                    if name == "generate"
                ],
                "loaded": [
                    {
                        name: [d, list(s), b.hex()]
                        for name, (d, s, b) in ((n, as_bytes(t)) for n, t in loaded.items())
                    }
                    for loaded in recorder.loaded
                ],
            }
            for kwargs, recorder in started
        ],
    }
    Path(f"{out_path}.rank{rank}").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
