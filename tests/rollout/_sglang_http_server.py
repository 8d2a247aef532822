"""An SGLang-shaped HTTP server for the CPU test of the disaggregated client.

    python tests/rollout/_sglang_http_server.py PORT

The HTTP layer is ours (stdlib); what it runs on a weight update is SGLang's own code from the
installed package: ``WeightUpdater.init_weights_update_group`` (``init_custom_process_group``) and
``WeightUpdater._receive_bucketed_weights_from_distributed`` (a ``FlattenedTensorBucket``
broadcast), over gloo instead of NCCL. Routes and reply shapes follow
sglang/srt/entrypoints/http_server.py; ``/dump`` (test only) returns what was loaded.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sglang.srt.utils import init_custom_process_group  # noqa: E402
from sglang.srt.utils.network import NetworkAddress  # noqa: E402
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket  # noqa: E402
from sglang_source import sglang_definitions  # noqa: E402

ns = sglang_definitions(
    "srt/model_executor/model_runner_components/weight_updater.py",
    ["WeightUpdater.init_weights_update_group", "WeightUpdater._receive_bucketed_weights_from_distributed"],
    {
        "torch": torch,
        "NetworkAddress": NetworkAddress,
        "FlattenedTensorBucket": FlattenedTensorBucket,
        "init_custom_process_group": init_custom_process_group,
        "logger": __import__("logging").getLogger("fake_sglang"),
    },
)
updater = SimpleNamespace(tp_rank=0, device="cpu", _model_update_group={})
# FAKE_SGLANG_FAULT=die|hang at the FAKE_SGLANG_FAULT_AT-th /generate request (1-based).
FAULT = os.environ.get("FAKE_SGLANG_FAULT")
FAULT_AT_GENERATE = int(os.environ.get("FAKE_SGLANG_FAULT_AT", "0")) if FAULT else -1
state = {"session": False, "loaded": {}, "log": []}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        route = self.path.strip("/")
        if route == "get_server_info":
            return self._reply({"tp_size": 1})
        if route == "dump":
            return self._reply(
                {
                    "log": state["log"],
                    "loaded": {
                        name: [
                            str(t.dtype),
                            list(t.shape),
                            t.contiguous().view(torch.uint8).numpy().tobytes().hex(),
                        ]
                        for name, t in state["loaded"].items()
                    },
                }
            )
        self._reply({"error": route}, 404)

    def do_POST(self):
        route = self.path.strip("/")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        state["log"].append(route)
        if route == "init_weights_update_group":
            ok, message = ns["init_weights_update_group"](
                updater,
                body["master_address"],
                body["master_port"],
                body["rank_offset"],
                body["world_size"],
                body["group_name"],
                body["backend"],
            )
            return self._reply({"success": ok, "message": message}, 200 if ok else 400)
        if route in ("begin_weight_update", "end_weight_update"):
            opening = route == "begin_weight_update"
            ok = state["session"] != opening
            state["session"] = opening if ok else state["session"]
            return self._reply(
                {"success": ok, "message": "Success" if ok else "session state"}, 200 if ok else 400
            )
        if route == "update_weights_from_distributed":
            if not state["session"] or body.get("load_format") != "flattened_bucket":
                return self._reply({"success": False, "message": "outside a session"}, 400)
            tensors = ns["_receive_bucketed_weights_from_distributed"](
                updater,
                names=body["names"],
                dtypes=body["dtypes"],
                shapes=body["shapes"],
                group_name=body["group_name"],
            )
            state["loaded"].update({name: t.clone() for name, t in tensors})
            return self._reply({"success": True, "message": "Succeeded to update parameter online."})
        if route == "flush_cache":
            return self._reply("Cache flushed.")
        if route == "generate" and state["log"].count("generate") == FAULT_AT_GENERATE:
            # Engine death mid-rollout (tests/loop/test_engine_death.py): the request is in flight.
            if FAULT == "die":
                os._exit(1)
            threading.Event().wait()  # "hang": never answer
        if route == "generate":  # every request: its first three prompt ids reversed, length-capped
            return self._reply(
                [
                    {
                        "output_ids": list(reversed(ids))[:3],
                        "meta_info": {
                            "id": f"{os.getpid()}-{i}",
                            "finish_reason": {"type": "length", "length": 3},
                        },
                    }
                    for i, ids in enumerate(body["input_ids"])
                ]
            )
        self._reply({"error": route}, 404)


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)  # SGLang's scheduler has its own world
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
