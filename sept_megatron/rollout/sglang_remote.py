"""SGLang servers on their own GPUs/nodes (``rollout.placement=disaggregated``).

Start-up: ``tools/launch_sglang_servers.sh`` starts one ``sglang serve`` per server on GPUs the
trainer does not use and prints their URLs; they go in ``rollout.server_urls`` (README,
"SGLang rollout"). Generation is plain HTTP (``POST /generate`` with token ids); prompts are
split into contiguous blocks, one per server, and come back in prompt order.

Data path of a weight sync (:func:`sync_weights_to_servers`, collective over all trainer
ranks): trainer rank 0 opens a weight-update session on every server
(``/begin_weight_update``). Then, one pipeline stage at a time, the stage's (tp 0, dp 0) rank
gathers its TP shards into full HF tensors (the adapter the HF export uses), packs each bucket
with SGLang's ``FlattenedTensorBucket`` and broadcasts the flat byte buffer over its own NCCL
group (rank 0 = that trainer rank, then every server's TP ranks, joined once through
``/init_weights_update_group``) while each server receives it in
``/update_weights_from_distributed`` (``load_format="flattened_bucket"``). Stages take turns:
a server handles one such request at a time, so two stages broadcasting at once deadlock.
Rank 0 finally closes the session (``/end_weight_update``, which finalises FP8 layouts) and
flushes the servers' caches. Every HTTP call that pairs with a collective runs in a thread
while this process joins the collective.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from sept_megatron.rollout.base import Generation, SamplingParams, WeightBucket, check_prompts
from sept_megatron.rollout.watchdog import EngineDied
from sept_megatron.rollout.sglang_engine import (
    check_sglang_version, group_generations, request_sampling_params, stop_token_ids)

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
        request = urllib.request.Request(f"{self.url}/{route}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as error:
            raise ServerError(f"{self.url}/{route}: HTTP {error.code}: {error.read().decode()[:500]}") from error
        except OSError as error:
            raise ServerError(f"{self.url}/{route}: {error}; is the server up? (rollout.server_urls)") from error
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


def _in_threads(calls: Sequence) -> list:
    """Run zero-argument callables concurrently; re-raise the first error."""
    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


class SGLangRemoteEngine:
    """A :class:`~sept_megatron.rollout.base.RolloutEngine` over SGLang HTTP servers.

    ``release_memory``/``resume_memory`` do nothing: the servers own their GPUs. Weights come
    from :func:`sync_weights_to_servers`; :meth:`update_weights` is the same path for a trainer
    that is a single process.
    """

    def __init__(self, server_urls: Sequence[str], *, tokenizer=None, model_path: str | None = None,
                 timeout_s: float = 3600.0, clients: Sequence[ServerClient] | None = None,
                 weight_backend: str = "nccl") -> None:
        if not server_urls and not clients:
            raise ValueError("rollout.placement=disaggregated needs rollout.server_urls")
        check_sglang_version()
        self.clients = list(clients) if clients else [ServerClient(u, timeout_s) for u in server_urls]
        if tokenizer is None and model_path is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, model_path) if tokenizer is not None else []
        self._groups: dict[str, Any] = {}  # group name -> process group to the servers
        self.weight_backend = weight_backend  # nccl; gloo only for CPU tests

    # --- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams
                 ) -> list[list[Generation]]:
        check_prompts(prompts)
        if not prompts:
            return []
        prompt_of, params = request_sampling_params(sampling, self.stop_ids, len(prompts))
        input_ids = [list(map(int, prompts[i])) for i in prompt_of]
        per_server = -(-len(input_ids) // len(self.clients))
        blocks = [(client, start, start + per_server) for client, start in
                  zip(self.clients, range(0, len(input_ids), per_server))]
        replies = _in_threads([
            (lambda c=client, a=start, b=stop: c.request(
                "generate", {"input_ids": input_ids[a:b], "sampling_params": params[a:b]}))
            for client, start, stop in blocks])
        outputs = [out for reply in replies for out in (reply if isinstance(reply, list) else [reply])]
        return group_generations(outputs, prompt_of, len(prompts), sampling, self.tokenizer)

    def release_memory(self) -> None:
        """Nothing to release: the servers run on their own GPUs."""

    def resume_memory(self) -> None:
        """Nothing to resume (see :meth:`release_memory`)."""

    # --- weights ---------------------------------------------------------------------------
    def begin_update(self) -> None:
        _in_threads([lambda c=c: c.checked("begin_weight_update", {}) for c in self.clients])

    def end_update(self) -> None:
        _in_threads([lambda c=c: c.checked("end_weight_update", {}) for c in self.clients])
        _in_threads([lambda c=c: c.request("flush_cache") for c in self.clients])

    def connect(self, group_name: str, *, master_address: str | None = None,
                master_port: int | None = None):
        """Create (once) the group {this process = rank 0, every server's TP ranks}."""
        backend = self.weight_backend
        if group_name in self._groups:
            return self._groups[group_name]
        from sglang.srt.utils import init_custom_process_group

        address = master_address or socket.gethostbyname(socket.gethostname())
        port = master_port or _free_port()
        sizes = [client.tp_size() for client in self.clients]
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        joins = [lambda c=c, o=o: c.checked("init_weights_update_group", {
            "master_address": address, "master_port": port, "rank_offset": o,
            "world_size": world, "group_name": group_name, "backend": backend})
            for c, o in zip(self.clients, offsets)]
        with ThreadPoolExecutor(max_workers=len(joins)) as pool:
            futures = [pool.submit(join) for join in joins]
            group = init_custom_process_group(backend=backend, init_method=f"tcp://{address}:{port}",
                                              world_size=world, rank=0, group_name=group_name)
            for future in futures:
                future.result()
        logger.info("weight group %s: this rank + %d server ranks", group_name, world - 1)
        self._groups[group_name] = group
        return group

    def broadcast_buckets(self, buckets: Iterable[WeightBucket], group_name: str,
                          device: torch.device | None = None) -> int:
        """Send buckets over a connected group, inside an open session; returns the count."""
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        group = self._groups[group_name]
        count = 0
        for bucket in buckets:
            named = [(name, t.detach().to(device) if device is not None else t.detach())
                     for name, t in bucket]
            flat = FlattenedTensorBucket(named_tensors=named).get_flattened_tensor()
            request = {"names": [n for n, _ in named],
                       "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                       "shapes": [list(t.shape) for _, t in named], "group_name": group_name,
                       "flush_cache": False, "load_format": "flattened_bucket"}
            with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
                futures = [pool.submit(c.checked, "update_weights_from_distributed", request)
                           for c in self.clients]
                dist.broadcast(flat, src=0, group=group)
                for future in futures:
                    future.result()
            count += 1
        return count

    def update_weights(self, buckets: Iterable[WeightBucket]) -> int:
        """A single-process trainer's sync: begin, broadcast every bucket, end."""
        self.connect("sept-stage0")
        self.begin_update()
        try:
            return self.broadcast_buckets(buckets, "sept-stage0", _device())
        finally:
            self.end_update()


def _device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# --- the trainer side: stage by stage ------------------------------------------------------
def stage_hf_buckets(model, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This stage's full HF-named buckets, yielded on the stage's (tp 0, dp 0) rank.

    Collective over the stage's TP group (its other ranks join the all-gathers and yield
    nothing); other DP replicas and other stages do nothing. Same plan, adapter and bucket cut as
    :func:`sept_megatron.reshard.stream_hf_buckets`, without the send to rank 0.
    """
    from megatron.core import parallel_state as ps

    from sept_megatron.convert.adapters import full_to_hf
    from sept_megatron.reshard import _live_params, plan_buckets, sync_plan

    arch = model.arch
    plan = sync_plan(arch, ps.get_pipeline_model_parallel_world_size(),
                     ps.get_virtual_pipeline_model_parallel_world_size())
    dtype = model.config.params_dtype
    element_size = dtype.itemsize
    my_stage = ps.get_pipeline_model_parallel_rank()
    if ps.get_data_parallel_rank() != 0:
        return
    leader = ps.get_tensor_model_parallel_rank() == 0
    params = _live_params(model)
    for bucket in plan_buckets(plan, bucket_bytes, element_size):
        if bucket[0].stage != my_stage:
            continue
        named = [(name, tensor.to(dtype)) for item in bucket for name, tensor in
                 zip(item.hf_names, full_to_hf(item.rule, _gather_full(params[item.megatron_name], item.rule), arch))]
        if leader:
            yield named


def _gather_full(shard: torch.Tensor, rule) -> torch.Tensor:
    """A parameter's full Megatron tensor from its TP shards (collective over the TP group)."""
    from megatron.core import parallel_state as ps

    from sept_megatron.convert.adapters import tp_join

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return shard.detach()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return tp_join(rule.kind, parts)


def sync_weights_to_servers(model, engine: SGLangRemoteEngine | None, bucket_bytes: int, *,
                            weights: str = "native") -> int:
    """Collective over all trainer ranks; rank 0 and the stage leaders pass their ``engine``
    (others None). ``weights`` is ``rollout.weights`` (fp8: each bucket quantised on its
    leader, as the colocated sync does).

    Returns the buckets this rank sent. Stage by stage, with a barrier between stages.
    """
    from sept_megatron.convert.fp8 import rollout_bucket_transform

    from megatron.core import parallel_state as ps

    rank = dist.get_rank() if dist.is_initialized() else 0
    stages = ps.get_pipeline_model_parallel_world_size()
    my_stage = ps.get_pipeline_model_parallel_rank()
    is_leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    if is_leader and engine is None:
        raise ValueError(f"rank {rank} leads pipeline stage {my_stage} and needs the remote engine")
    multi = dist.is_initialized() and dist.get_world_size() > 1
    if rank == 0:
        engine.begin_update()
    sent = 0
    for stage in range(stages):
        if stage == my_stage:
            name = f"sept-stage{stage}"
            if is_leader:
                engine.connect(name)
            stream = rollout_bucket_transform(weights, model.arch)(stage_hf_buckets(model, bucket_bytes))
            sent = engine.broadcast_buckets(stream, name, _device()) if is_leader else sum(1 for _ in stream)
        if multi:
            dist.barrier()  # one stage at a time: servers serve one update request at a time
    if rank == 0:
        engine.end_update()
    return sent
