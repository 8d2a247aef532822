"""The SGLang backend on CPU, against the real sglang package (what CPU can run of it).

Real SGLang code exercised here: ``ServerArgs`` and its CLI parser (field names, types and
choices of our engine arguments), ``SamplingParams`` (+ ``verify``), ``FlattenedTensorBucket``,
``MultiprocessingSerializer`` with its allow-listing unpickler, ``monkey_patch_torch_reductions``,
and, taken from the installed source because their modules import torchvision (see
sglang_source.py), ``Engine._serialize_tensors_per_rank``, ``BaseTpWorker.deserialize_own_rank``,
``WeightUpdater._update_weights_from_flattened_bucket``, the ``FINISH_*`` reasons and the
signatures of every ``sglang.Engine`` method we call. Not on CPU: starting ``sglang.Engine``
(CUDA + sglang-kernel) and CUDA-IPC payloads; see test_sglang_gpu.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer
from sglang_recorder import RecordingEngine, as_bytes, receive, receive_in_process
from sglang_source import require_sglang, sglang_definitions

from sept_megatron.config import RolloutConfig
from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.rollout import SamplingParams, build_engine
from sept_megatron.rollout.sglang_engine import SGLangRolloutEngine, engine_kwargs, prepare_fp8_model_dir
from sept_megatron.rollout.sglang_requests import (
    SGLANG_VERSION,
    check_sglang_version,
    request_sampling_params,
    stop_token_ids,
    to_generation,
)
from sept_megatron.weight_sync.plan import plan_buckets, sync_plan
from sept_megatron.weight_sync.sglang_ipc import load_buckets, pack_bucket


@pytest.fixture(scope="module", autouse=True)
def _sglang():
    require_sglang()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 checkpoint dir, its tokenizer and model."""
    root = tmp_path_factory.mktemp("sglang_tiny")
    tokenizer = make_tokenizer(root / "tok")
    model = make_tiny_model("qwen2", tokenizer)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return root / "hf", tokenizer, model


def hf_buckets(model, bucket_mb: float) -> list[list[tuple[str, torch.Tensor]]]:
    """The model's HF tensors cut by the real sync plan into buckets of ``bucket_mb``."""
    state = model.state_dict()
    plan = sync_plan(arch_from_hf_config(model.config), pipeline_parallel=1)
    return [
        [(name, state[name]) for item in bucket for name in item.hf_names]
        for bucket in plan_buckets(plan, int(bucket_mb * (1 << 20)), element_size=4)
    ]


# --- package and start-up -----------------------------------------------------------------
def test_pinned_version_is_installed_and_a_mismatch_names_both():
    assert check_sglang_version() == SGLANG_VERSION
    with pytest.raises(ImportError, match=r"0\.5\.21.*0\.5\.23|0\.5\.23.*0\.5\.21"):
        check_sglang_version("0.5.23")


def _cli_argv(kwargs: dict) -> list[str]:
    argv = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def test_our_config_builds_sglangs_server_args(tiny):
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    rollout = RolloutConfig(backend="sglang", engine_tp=2, mem_fraction_static=0.4)
    kwargs = engine_kwargs(
        str(tiny[0]),
        engine_tp=rollout.engine_tp,
        base_gpu_id=2,
        mem_fraction_static=rollout.mem_fraction_static,
        seed=7,
    )
    direct = ServerArgs(**kwargs)  # what sglang.Engine(**kwargs) builds: unknown names fail
    parsed = prepare_server_args(_cli_argv(kwargs))  # SGLang's CLI checks types and choices
    for key, value in kwargs.items():
        assert getattr(direct, key) == value == getattr(parsed, key), key
    assert (direct.enable_memory_saver, direct.skip_tokenizer_init, direct.tp_size) == (True, True, 2)
    with pytest.raises(SystemExit):  # a bad value is refused by SGLang's own parser
        prepare_server_args(_cli_argv(dict(kwargs, dtype="float8")))


def test_fp8_engine_dir_declares_blockwise_fp8(tiny, tmp_path):
    from sglang.srt.server_args import ServerArgs

    out = prepare_fp8_model_dir(str(tiny[0]), str(tmp_path / "fp8"))
    config = __import__("json").loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert ServerArgs(**engine_kwargs(out, load_format="dummy")).load_format == "dummy"
    with pytest.raises(ValueError, match="already has a quantization_config"):
        prepare_fp8_model_dir(out, str(tmp_path / "again"))


def test_build_engine_reaches_the_sglang_backend(tiny):
    engine = build_engine("sglang", str(tiny[0]), engine=RecordingEngine())
    assert isinstance(engine, SGLangRolloutEngine) and engine.stop_ids == [tiny[1].eos_token_id]


# --- sampling and finish reasons ------------------------------------------------------------
def test_sampling_maps_onto_sglangs_sampling_params():
    from sglang.srt.sampling.sampling_params import TOP_K_ALL
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSampling

    ours = SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, n=3, max_new_tokens=77, seed=5)
    prompt_of, params = request_sampling_params(ours, [2, 9], num_prompts=2)
    assert prompt_of == [0, 0, 0, 1, 1, 1]  # prompt-major, one request per sample
    seeds = [p["sampling_seed"] for p in params]
    assert len(set(seeds)) == 6
    assert seeds == [p["sampling_seed"] for p in request_sampling_params(ours, [9, 2], 2)[1]]
    for p in params:
        sglang_params = SGLangSampling(**p)
        sglang_params.verify(vocab_size=512)
        assert (sglang_params.temperature, sglang_params.top_p, sglang_params.top_k) == (0.7, 0.9, TOP_K_ALL)
        assert (sglang_params.max_new_tokens, sglang_params.n) == (77, 1)
        assert sglang_params.stop_token_ids == {2, 9}

    greedy = SamplingParams(temperature=0.0, n=4, max_new_tokens=5)
    prompt_of, params = request_sampling_params(greedy, [2], num_prompts=3)
    assert prompt_of == [0, 1, 2] and "sampling_seed" not in params[0]
    sglang_greedy = SGLangSampling(**params[0])
    assert sglang_greedy.top_k == 1  # SGLang's greedy

    with pytest.raises(ValueError, match="top_k"):
        request_sampling_params(SamplingParams(top_k=0), [2], 1)
    with pytest.raises(ValueError, match="temperature"):
        request_sampling_params(SamplingParams(temperature=-1.0), [2], 1)


@pytest.fixture(scope="module")
def finish():
    return sglang_definitions(
        "srt/managers/schedule_batch.py",
        ["BaseFinishReason", "FINISH_MATCHED_TOKEN", "FINISH_MATCHED_STR", "FINISH_LENGTH", "FINISH_ABORT"],
        {},
    )


def output(ids, reason, rid="r1"):
    return {"output_ids": ids, "meta_info": {"id": rid, "finish_reason": reason.to_json()}}


def test_finish_reasons_map_to_ours(finish, tiny):
    tokenizer = tiny[1]
    eos = tokenizer.eos_token_id
    stopped = to_generation(output([5, 6, eos], finish["FINISH_MATCHED_TOKEN"](eos)), tokenizer)
    assert (stopped.token_ids, stopped.finish_reason) == ([5, 6, eos], "stop")
    trimmed = to_generation(output([5, 6], finish["FINISH_MATCHED_TOKEN"](eos)))
    assert trimmed.token_ids == [5, 6, eos]  # EOS kept, as the hf backend and the trainer expect
    long = to_generation(output([5, 6, 7], finish["FINISH_LENGTH"](3)), tokenizer)
    assert (long.token_ids, long.finish_reason) == ([5, 6, 7], "length")
    assert long.text == tokenizer.decode([5, 6, 7], skip_special_tokens=True)
    assert to_generation(output([5], finish["FINISH_MATCHED_STR"]("\n"))).finish_reason == "stop"
    with pytest.raises(RuntimeError, match=r"aborted request 'req-17'.*out of memory"):
        to_generation(output([5], finish["FINISH_ABORT"]("out of memory", 503), rid="req-17"))
    with pytest.raises(RuntimeError, match="unknown finish reason"):
        to_generation({"output_ids": [1], "meta_info": {"id": "x", "finish_reason": None}})


def test_generate_requests_and_regroups_in_prompt_order(tiny, finish):
    tokenizer = tiny[1]
    eos = tokenizer.eos_token_id

    def outputs(input_ids, sampling_params):  # answer k of request j: [first prompt id, j]
        return [
            output([ids[0], j, eos], finish["FINISH_MATCHED_TOKEN"](eos), rid=str(j))
            for j, ids in enumerate(input_ids)
        ]

    recorder = RecordingEngine(outputs=outputs)
    engine = SGLangRolloutEngine(str(tiny[0]), engine=recorder)
    prompts = [[11, 12], [21], [31, 32, 33]]
    result = engine.generate(prompts, SamplingParams(temperature=1.0, n=2, max_new_tokens=9, seed=1))
    assert [[g.token_ids for g in row] for row in result] == [
        [[11, 0, eos], [11, 1, eos]],
        [[21, 2, eos], [21, 3, eos]],
        [[31, 4, eos], [31, 5, eos]],
    ]
    ((name, arguments),) = recorder.calls
    assert name == "generate" and arguments["input_ids"] == [
        [11, 12],
        [11, 12],
        [21],
        [21],
        [31, 32, 33],
        [31, 32, 33],
    ]
    assert all(
        p["max_new_tokens"] == 9 and p["stop_token_ids"] == [eos] for p in arguments["sampling_params"]
    )
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, n=3, max_new_tokens=4))
    assert len(recorder.calls[-1][1]["input_ids"]) == 3 and all(len(row) == 3 for row in greedy)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())


# --- weight payloads --------------------------------------------------------------------------
def fp8_bucket() -> list[tuple[str, torch.Tensor]]:
    """What the FP8 bucket transform yields: e4m3 weights with float32 per-block scales."""
    weight = (torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 100).to(torch.float8_e4m3fn)
    return [
        ("model.layers.0.mlp.down_proj.weight", weight),
        (
            "model.layers.0.mlp.down_proj.weight_scale_inv",
            torch.rand(2, 1, generator=torch.Generator().manual_seed(1)) + 0.5,
        ),
    ]


def test_payloads_unpack_bitwise_in_sglangs_receiver_process(tiny):
    """Packed here, unpacked by SGLang's own receiving code in a separate (spawned) process, as
    the scheduler does; bucket size changes only the number of payloads."""
    model = tiny[2]
    expected = {name: as_bytes(t) for name, t in model.state_dict().items()}
    expected |= {name: as_bytes(t) for name, t in fp8_bucket()}
    rounds, buffers = [], []
    for bucket_mb in (0.02, 64):
        packed = [pack_bucket(bucket) for bucket in hf_buckets(model, bucket_mb) + [fp8_bucket()]]
        rounds.append([payload for payload, _ in packed])
        buffers.append([buffer for _, buffer in packed])  # alive until SGLang has loaded them
    counts = [len(payloads) for payloads in rounds]
    for received in receive_in_process(rounds, tp_rank=0):
        assert received.keys() == expected.keys()
        for name in expected:
            assert received[name] == expected[name], name  # dtype, shape and every byte
    assert counts[0] > counts[1] == 2  # small buckets: more payloads, same tensors


def test_each_tp_rank_opens_its_own_payload():
    first = [("w", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))]
    second = [("w", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) + 10)]
    payloads = [pack_bucket(first)[0], pack_bucket(second)[0]]
    assert torch.equal(receive(payloads, tp_rank=0)["w"], first[0][1])
    assert torch.equal(receive(payloads, tp_rank=1)["w"], second[0][1])


@dataclasses.dataclass
class FlattenedTensorMetadata:  # a look-alike of SGLang's class, from another module
    name: str


def test_sglangs_allow_list_rejects_look_alike_classes():
    from sglang.srt.utils import MultiprocessingSerializer

    forged = MultiprocessingSerializer.serialize(
        {"flattened_tensor": torch.zeros(4, dtype=torch.uint8), "metadata": [FlattenedTensorMetadata("w")]}
    )
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        MultiprocessingSerializer.deserialize(forged)


# --- the engine's update protocol -----------------------------------------------------------
def test_round_memory_and_update_order(tiny, finish):
    tokenizer, model = tiny[1], tiny[2]
    eos = tokenizer.eos_token_id
    recorder = RecordingEngine(
        outputs=lambda ids, params: [output([eos], finish["FINISH_MATCHED_TOKEN"](eos)) for _ in ids]
    )
    engine = SGLangRolloutEngine(str(tiny[0]), engine=recorder)
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))
    engine.release_memory()
    with pytest.raises(RuntimeError, match="released"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))
    buckets = hf_buckets(model, 0.02)
    assert load_buckets(engine, iter(buckets)) == len(buckets) > 2
    engine.resume_memory()
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))

    names = recorder.names
    k = len(buckets)
    assert names == (
        ["generate", "release_memory_occupation", "resume_memory_occupation", "begin_weight_update"]
        + ["update_weights_from_tensor"] * k
        + ["end_weight_update", "flush_cache", "resume_memory_occupation", "generate"]
    )
    calls = dict((i, args) for i, (_, args) in enumerate(recorder.calls))
    assert calls[1]["tags"] is None  # release everything
    assert calls[2]["tags"] == ["weights"]  # weights back first, then the load
    assert calls[4 + k + 2]["tags"] == ["kv_cache", "cuda_graph"]  # after the load
    assert all(recorder.calls[4 + i][1]["flush_cache"] is False for i in range(k))
    state = model.state_dict()
    assert recorder.loaded[0].keys() == state.keys()
    assert all(torch.equal(recorder.loaded[0][name], state[name]) for name in state)


def test_resume_without_a_sync_refuses_to_generate_from_released_weights(tiny):
    engine = SGLangRolloutEngine(str(tiny[0]), engine=RecordingEngine())
    engine.release_memory()
    engine.resume_memory()
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[1]], SamplingParams())


def test_a_failed_load_raises_and_closes_the_session(tiny):
    class Refusing(RecordingEngine):
        def update_weights_from_tensor(self, *args, **kwargs):
            super().update_weights_from_tensor(*args, **kwargs)
            return False, "Failed to update parameter online: shape mismatch"

    recorder = Refusing()
    engine = SGLangRolloutEngine(str(tiny[0]), engine=recorder)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        load_buckets(engine, hf_buckets(tiny[2], 64))
    assert recorder.names[-1] == "end_weight_update" and not recorder.session_open


def test_a_refused_begin_stops_before_any_load_and_leaves_the_session(tiny):
    recorder = RecordingEngine()
    recorder.session_open = True  # another client's session (SGLang allows one)
    engine = SGLangRolloutEngine(str(tiny[0]), engine=recorder)
    with pytest.raises(RuntimeError, match="begin_weight_update failed: .*already open"):
        load_buckets(engine, hf_buckets(tiny[2], 64))
    assert recorder.names == ["begin_weight_update"] and recorder.session_open


def test_fp8_engine_dir_goes_to_the_run_dir_and_is_replaced_atomically(tiny, tmp_path):
    from sept_megatron.rollout import backend_kwargs

    kwargs = backend_kwargs(
        RolloutConfig(backend="sglang", weights="fp8"),
        tokenizer=tiny[1],
        seed=0,
        device="cpu",
        dtype=torch.float32,
        progress=False,
        run_dir=str(tmp_path / "run"),
    )
    assert kwargs["fp8_dir"] == str(tmp_path / "run" / "sglang_fp8_model")
    out = tmp_path / "run" / "sglang_fp8_model"
    prepare_fp8_model_dir(str(tiny[0]), str(out))
    before = (out / "config.json").stat().st_ino
    prepare_fp8_model_dir(str(tiny[0]), str(out))  # a second job / restart: a new file, renamed
    assert (out / "config.json").stat().st_ino != before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json"]


def test_stop_ids_union_generation_config(tiny, tmp_path):
    tokenizer = tiny[1]
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [{tokenizer.eos_token_id}, 7]}}')
    assert stop_token_ids(tokenizer, str(tmp_path)) == [tokenizer.eos_token_id, 7]


def test_backend_kwargs_follow_the_rollout_section(tiny):
    from sept_megatron.rollout import backend_kwargs

    common = dict(tokenizer=tiny[1], seed=3, device="cpu", dtype=torch.float32, progress=False)
    assert backend_kwargs(RolloutConfig(batch_size=8), **common) == dict(
        device="cpu", dtype=torch.float32, batch_size=8, progress=False, static_cache=False
    )
    colocated = backend_kwargs(RolloutConfig(backend="sglang", mem_fraction_static=0.4), **common)
    engine = build_engine("sglang", str(tiny[0]), **colocated, engine=RecordingEngine())
    assert isinstance(engine, SGLangRolloutEngine) and colocated["mem_fraction_static"] == 0.4
    remote = backend_kwargs(
        RolloutConfig(backend="sglang", placement="disaggregated", server_urls=["http://n1:30000"]), **common
    )
    assert remote["server_urls"] == ["http://n1:30000"] and remote["placement"] == "disaggregated"
    assert remote["weight_backend"] == "gloo"  # the trainer's device is the CPU here
    assert (
        backend_kwargs(
            RolloutConfig(backend="sglang", placement="disaggregated"), **dict(common, device="cuda:0")
        )["weight_backend"]
        == "nccl"
    )


@pytest.mark.slow
def test_engine_group_of_two_gathers_each_ranks_payload_to_its_tp_rank():
    from mp import run_torchrun

    result = run_torchrun(2, "tests/rollout/_sglang_group_worker.py", timeout=300)
    assert "rank 0 OK" in result.output and "rank 1 OK" in result.output
