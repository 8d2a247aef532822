"""SGLang servers on their own GPUs/nodes (``rollout.placement=disaggregated``).

Start-up: ``examples/sglang_servers.sbatch`` starts one ``sglang serve`` per server on GPUs
the trainer does not use and prints their URLs; they go in ``rollout.server_urls`` (README,
"SGLang rollout"). Generation is plain HTTP (``POST /generate`` with token ids); prompts are
split into contiguous blocks, one per server, and come back in prompt order. Weights reach the
servers through :mod:`sept_megatron.weight_sync.server_broadcast`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sept_megatron.data import load_tokenizer
from sept_megatron.rollout.base import Generation, SamplingParams, check_prompts
from sept_megatron.rollout.sglang_requests import (
    check_sglang_version,
    group_generations,
    request_sampling_params,
    stop_token_ids,
)
from sept_megatron.rollout.watchdog import EngineDied

logger = logging.getLogger(__name__)


class ServerError(EngineDied):
    """An SGLang server refused a request or could not be reached (died, or no answer within
    rollout.timeout_minutes: the socket timeout)."""


class ServerClient:
    """JSON over HTTP to one SGLang server (its routes: sglang/srt/entrypoints/http_server.py)."""

    def __init__(self, url: str, timeout_s: float = 3600.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"rollout.server_urls entry {url!r}: expected http://host:port")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def request(self, route: str, payload: dict | None = None, method: str = "POST") -> Any:
        data = None if payload is None and method == "GET" else json.dumps(payload or {}).encode()
        request = urllib.request.Request(
            f"{self.url}/{route}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as error:
            raise ServerError(
                f"{self.url}/{route}: HTTP {error.code}: {error.read().decode()[:500]}"
            ) from error
        except OSError as error:
            raise ServerError(
                f"{self.url}/{route}: {error}; is the server up? (rollout.server_urls)"
            ) from error
        try:
            return json.loads(body) if body else None
        except json.JSONDecodeError:
            return body

    def checked(self, route: str, payload: dict | None = None) -> dict:
        """A weight-update route: ``{"success": bool, "message": str}``; raise on failure."""
        reply = self.request(route, payload)
        if not isinstance(reply, dict) or not reply.get("success", False):
            raise ServerError(f"{self.url}/{route} failed: {reply!r}")
        return reply

    def tp_size(self) -> int:
        return int(self.request("get_server_info", method="GET")["tp_size"])

    def quantization(self) -> tuple[str | None, str]:
        """(quantization, model path) the server runs: ``/get_server_info`` (sglang 0.5.21's
        ``server_info``: the resolved ServerArgs) says ``quantization`` when it was asked for;
        otherwise the model's own config.json, where this host can read it, declares it
        (``quantization_config.quant_method``, what SGLang's ModelConfig reads)."""
        info = self.request("get_server_info", method="GET")
        model_path = str(info.get("model_path") or "")
        quantization = info.get("quantization")
        config = os.path.join(model_path, "config.json")
        if quantization is None and model_path and os.path.isfile(config):
            with open(config) as f:
                quantization = (json.load(f).get("quantization_config") or {}).get("quant_method")
        return quantization, model_path


def check_servers_serve_fp8(clients: Sequence[ServerClient]) -> None:
    """``rollout.weights=fp8`` sends e4m3 weights and their scales; a server started from the
    bf16 model would copy the e4m3 bytes into bf16 parameters (SGLang's loader only warns
    about the scales) and generate garbage. Refuse at start unless every server runs FP8."""
    for client in clients:
        quantization, model_path = client.quantization()
        if quantization != "fp8":
            raise ServerError(
                f"rollout.weights=fp8 but the SGLang server {client.url} serves {model_path!r} "
                f"with quantization={quantization!r}: start the servers from the FP8 model "
                "directory (`sept-megatron convert` FP8 export, or a config.json with the FP8 "
                "quantization_config) or with --quantization fp8, or set rollout.weights=native"
            )


def in_threads(calls: Sequence) -> list:
    """Run zero-argument callables concurrently; re-raise the first error."""
    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


class SGLangRemoteEngine:
    """A :class:`~sept_megatron.rollout.base.RolloutEngine` over SGLang HTTP servers.

    ``release_memory``/``resume_memory`` do nothing: the servers own their GPUs. Weights come
    from :mod:`sept_megatron.weight_sync.server_broadcast` (the :class:`~sept_megatron.rollout.
    base.ServerWeightEngine` capability: an update session opened and closed here, the bucket
    broadcast there).
    """

    shard_sequences = 1  # per-request seeds: any split of a rollout draws the same samples

    def __init__(
        self,
        server_urls: Sequence[str],
        *,
        tokenizer=None,
        model_path: str | None = None,
        timeout_s: float = 3600.0,
        clients: Sequence[ServerClient] | None = None,
        weight_backend: str = "nccl",
        weights: str = "native",
    ) -> None:
        if not server_urls and not clients:
            raise ValueError("rollout.placement=disaggregated needs rollout.server_urls")
        check_sglang_version()
        self.clients = list(clients) if clients else [ServerClient(u, timeout_s) for u in server_urls]
        if weights == "fp8":
            check_servers_serve_fp8(self.clients)
        if tokenizer is None and model_path is not None:
            tokenizer = load_tokenizer(model_path)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, model_path) if tokenizer is not None else []
        self.weight_backend = weight_backend  # nccl; gloo only for CPU tests

    # --- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Generation]]:
        check_prompts(prompts)
        if not prompts:
            return []
        prompt_of, params = request_sampling_params(sampling, self.stop_ids, len(prompts))
        input_ids = [list(map(int, prompts[i])) for i in prompt_of]
        per_server = -(-len(input_ids) // len(self.clients))
        blocks = [
            (client, start, start + per_server)
            for client, start in zip(self.clients, range(0, len(input_ids), per_server))
        ]
        replies = in_threads(
            [
                (
                    lambda c=client, a=start, b=stop: c.request(
                        "generate", {"input_ids": input_ids[a:b], "sampling_params": params[a:b]}
                    )
                )
                for client, start, stop in blocks
            ]
        )
        outputs = [out for reply in replies for out in (reply if isinstance(reply, list) else [reply])]
        return group_generations(outputs, prompt_of, len(prompts), sampling, self.tokenizer)

    def release_memory(self) -> None:
        """Nothing to release: the servers run on their own GPUs."""

    def resume_memory(self) -> None:
        """Nothing to resume (see :meth:`release_memory`)."""

    # --- weights: the ServerWeightEngine capability (weight_sync.server_broadcast) ----------
    def begin_update(self) -> None:
        in_threads([lambda c=c: c.checked("begin_weight_update", {}) for c in self.clients])

    def end_update(self) -> None:
        in_threads([lambda c=c: c.checked("end_weight_update", {}) for c in self.clients])
        in_threads([lambda c=c: c.request("flush_cache") for c in self.clients])


def address_towards(url: str) -> str:
    """This host's address on the interface that routes to ``url``'s host: what the servers
    must dial to join the weight group. A UDP ``connect`` sends nothing, it only asks the
    kernel for the route. ``gethostbyname(gethostname())`` is not used: /etc/hosts often maps
    the hostname to 127.0.1.1, which a server on another node would dial as itself."""
    parsed = urllib.parse.urlsplit(url)
    if not parsed.hostname:
        raise ValueError(f"rollout.server_urls entry {url!r}: expected http://host:port")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((parsed.hostname, parsed.port or 80))
            return sock.getsockname()[0]
    except OSError as error:
        raise ServerError(f"no route from this host to {url} ({error}); check rollout.server_urls") from error
