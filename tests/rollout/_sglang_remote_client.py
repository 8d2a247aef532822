"""Client side of the disaggregated CPU test: python _sglang_remote_client.py URL1 URL2 OUT.json"""

import json
import os
import sys

import torch
import torch.distributed as dist

from sept_megatron.rollout import SamplingParams, build_engine
from sept_megatron.weight_sync.server_broadcast import send_buckets

urls, out = sys.argv[1:3], sys.argv[3]
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
dist.init_process_group("gloo", rank=0, world_size=1)
engine = build_engine("sglang", None, placement="disaggregated", server_urls=urls, weight_backend="gloo")
generator = torch.Generator().manual_seed(0)
buckets = [
    [
        ("model.embed_tokens.weight", torch.randn(8, 4, generator=generator).to(torch.bfloat16)),
        ("model.norm.weight", torch.rand(4, generator=generator)),
    ],
    [
        (
            "model.layers.0.mlp.down_proj.weight",
            (torch.randn(4, 4, generator=generator) * 50).to(torch.float8_e4m3fn),
        ),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", torch.rand(1, 1, generator=generator)),
    ],
]
sent = send_buckets(engine, buckets)
generations = engine.generate(
    [[1, 2, 3, 4], [5, 6], [7, 8, 9]], SamplingParams(temperature=0.5, n=2, max_new_tokens=3, seed=3)
)
json.dump(
    {
        "sent": sent,
        "expected": {
            n: [str(t.dtype), list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes().hex()]
            for bucket in buckets
            for n, t in bucket
        },
        "generations": [[[g.token_ids, g.finish_reason] for g in row] for row in generations],
    },
    open(out, "w"),
)
