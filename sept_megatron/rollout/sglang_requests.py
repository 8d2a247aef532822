"""What both SGLang backends share: the pinned version, and SGLang's request and response
shapes (sampling parameters per request, stop ids, finish reasons -> :class:`Generation`).

The colocated engine (:mod:`~sept_megatron.rollout.sglang_engine`) hands these requests to an
in-process ``sglang.Engine``; the servers' client (:mod:`~sept_megatron.rollout.sglang_remote`)
posts them over HTTP. Neither imports the other.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sept_megatron.rollout.base import Generation, SamplingParams, sequence_seed, stop_ids

SGLANG_VERSION = "0.5.21"
"""The sglang release this backend is written and tested against (pinned in setup.py's [gpu]
extra): the first with ``begin/end_weight_update``, and the last whose torch pin (2.13.0) is
ours; 0.5.22 moved to torch 2.14.1."""


def check_sglang_version(installed: str | None = None) -> str:
    """Fail early, naming both versions, when the installed sglang is not the pinned one."""
    if installed is None:
        try:
            installed = importlib.metadata.version("sglang")
        except importlib.metadata.PackageNotFoundError as error:
            raise ImportError(
                f"rollout.backend=sglang needs sglang=={SGLANG_VERSION}, which is not installed: "
                "`pip install -e .[gpu]` on a CUDA machine, or rollout.backend=hf"
            ) from error
    if installed != SGLANG_VERSION:
        raise ImportError(
            f"rollout.backend=sglang is written against sglang {SGLANG_VERSION}, but sglang "
            f"{installed} is installed; run `pip install sglang=={SGLANG_VERSION}` (the [gpu] "
            "extra pins it)"
        )
    return installed


def stop_token_ids(tokenizer, model_path: str | None = None) -> list[int]:
    """EOS ids that end a response: the tokenizer's EOS plus the checkpoint's
    generation_config EOS list (instruct models end turns with ``<|im_end|>`` but may emit
    ``<|endoftext|>``), the same union the hf backend stops on (:func:`~sept_megatron.rollout.
    base.stop_ids`)."""
    path = Path(model_path or "") / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if model_path and path.is_file() else None
    return stop_ids(tokenizer, eos)


# --- sampling -------------------------------------------------------------------------------
def request_sampling_params(
    sampling: SamplingParams, stop_ids: Sequence[int], num_prompts: int
) -> tuple[list[int], list[dict[str, Any]]]:
    """Our :class:`SamplingParams` -> one SGLang request per sample, prompt-major.

    Returns ``(prompt index of each request, sampling_params of each request)``. Each sample is
    its own request with ``n=1``: SGLang gives all ``n`` parallel samples of one request the
    same ``sampling_seed``, which would make them identical under deterministic inference; the
    radix cache still computes each prompt's prefix once. Greedy decoding runs each prompt once
    (the caller copies it ``n`` times). ``max_new_tokens`` is always set (SGLang's default is
    128) and top_k=-1 means no cut in both APIs.
    """
    sampling.check()
    greedy = sampling.temperature == 0
    copies = 1 if greedy else sampling.n
    base = {
        "max_new_tokens": sampling.max_new_tokens,
        "n": 1,
        "stop_token_ids": sorted(set(int(i) for i in stop_ids)),
        "temperature": 0.0 if greedy else float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "top_k": 1 if greedy else int(sampling.top_k),
        "skip_special_tokens": True,
    }
    keys = sampling.seed_keys if sampling.seed_keys is not None else range(num_prompts)
    if len(keys) != num_prompts:
        raise ValueError(f"SamplingParams.seed_keys has {len(keys)} keys for {num_prompts} prompts")
    prompt_of, params = [], []
    for index in range(num_prompts):
        for copy in range(copies):
            request = dict(base)
            if sampling.seed is not None:  # keyed by the prompt's place in the whole rollout
                request["sampling_seed"] = sequence_seed(sampling.seed, keys[index], copy)
            prompt_of.append(index)
            params.append(request)
    return prompt_of, params


def to_generation(output: dict[str, Any], tokenizer=None) -> Generation:
    """One SGLang output (``{"output_ids", "meta_info": {"finish_reason", "id"}}``) -> ours.

    SGLang's finish reasons (``FINISH_*.to_json()``): ``stop`` (with the ``matched`` token id
    or string), ``length``, ``abort``. An abort raises: a silently short answer would be trained
    on. With ``skip_tokenizer_init`` the outputs are raw ids; our convention keeps the EOS in
    ``token_ids`` when it was produced, so a matched stop id missing at the end is appended.
    """
    meta = output.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type")
    token_ids = [int(t) for t in output.get("output_ids", [])]
    if kind == "abort":
        raise RuntimeError(
            f"SGLang aborted request {meta.get('id')!r}: {reason.get('message')} "
            f"(status {reason.get('status_code')})"
        )
    if kind == "stop":
        matched = reason.get("matched")
        if isinstance(matched, int) and (not token_ids or token_ids[-1] != matched):
            token_ids.append(matched)
        finish = "stop"
    elif kind == "length":
        finish = "length"
    else:
        raise RuntimeError(
            f"SGLang request {meta.get('id')!r} ended with an unknown finish "
            f"reason {reason!r}; expected stop, length or abort"
        )
    text = tokenizer.decode(token_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return Generation(token_ids=token_ids, text=text, finish_reason=finish)


def group_generations(
    outputs: Sequence[dict],
    prompt_of: Sequence[int],
    num_prompts: int,
    sampling: SamplingParams,
    tokenizer=None,
) -> list[list[Generation]]:
    """Requests (prompt-major) -> ``n`` generations per prompt; greedy results are copied."""
    if len(outputs) != len(prompt_of):
        raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {len(prompt_of)} requests")
    grouped: list[list[Generation]] = [[] for _ in range(num_prompts)]
    for index, output in zip(prompt_of, outputs):
        grouped[index].append(to_generation(output, tokenizer))
    if sampling.temperature == 0:
        return [[_copy(row[0]) for _ in range(sampling.n)] for row in grouped]
    return grouped


def _copy(generation: Generation) -> Generation:
    return Generation(
        token_ids=list(generation.token_ids), text=generation.text, finish_reason=generation.finish_reason
    )


# --- the engine -----------------------------------------------------------------------------
