"""rollout.backend=sglang in the SePT loop, at world size 2 on CPU (see _sglang_loop.py for what
is real: everything but the started ``sglang.Engine``, whose calls are recorded against the
installed sglang's signatures and whose payloads SGLang's own receiver unpacks).

One engine group of both ranks (``rollout.engine_tp=2``): rank 0 starts the engine with
``tp_size=2``; every round it generates the whole rollout, the engine's memory is released for
training, both ranks take part in each weight update (payload i -> SGLang TP rank i), and the
KV cache comes back after the load. After the last round the engine holds exactly the weights
the run exports. Two groups of one (``engine_tp=1``): each rank starts and drives its own
engine, and the rollout is shared between them.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from mp import run_torchrun
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
from sglang_source import require_sglang  # noqa: E402

pytestmark = pytest.mark.slow

ROUNDS = 2


def _sglang_run(tiny_run_inputs, tmp_path, engine_tp: int, *extra: str) -> list[dict]:
    require_sglang()
    out = tmp_path / "calls.json"
    run_torchrun(
        2,
        "tests/loop/_sglang_loop.py",
        out,
        f"model.hf_path={tiny_run_inputs / 'hf'}",
        f"data.train_files={tiny_run_inputs / 'train.jsonl'}",
        f"train.rounds={ROUNDS}",
        "train.prompts_per_round=4",
        "train.mini_batch_size=4",
        "train.micro_batch_size=1",
        "data.max_response_length=8",
        f"logging.run_dir={tmp_path / 'run'}",
        "logging.progress=false",
        "checkpoint.export_hf=true",
        "parallel.tensor_parallel=2",
        "rollout.backend=sglang",
        f"rollout.engine_tp={engine_tp}",
        "rollout.n=2",
        *extra,
        timeout=420,
    )
    return [json.loads((tmp_path / f"calls.json.rank{r}").read_text()) for r in range(2)]


def one_round(updates: int) -> list[str]:
    return (
        ["generate", "release_memory_occupation", "resume_memory_occupation", "begin_weight_update"]
        + ["update_weights_from_tensor"] * updates
        + ["end_weight_update", "flush_cache", "resume_memory_occupation"]
    )


def test_one_engine_group_of_two_ranks(tiny_run_inputs, tmp_path):
    rank0, rank1 = _sglang_run(tiny_run_inputs, tmp_path, engine_tp=2)
    assert rank0["rc"] == rank1["rc"] == 0
    assert rank1["engines"] == []  # only the owner starts sglang.Engine
    (engine,) = rank0["engines"]
    assert (engine["kwargs"]["tp_size"], engine["kwargs"]["base_gpu_id"]) == (2, 0)
    assert engine["kwargs"]["enable_memory_saver"] and engine["kwargs"]["skip_tokenizer_init"]
    names = [name for name, _ in engine["calls"]]
    updates = names.count("update_weights_from_tensor") // ROUNDS
    assert updates >= 1 and names == one_round(updates) * ROUNDS
    tags = [args["tags"] for name, args in engine["calls"] if name.endswith("memory_occupation")]
    assert tags == [None, ["weights"], ["kv_cache", "cuda_graph"]] * ROUNDS
    assert engine["payloads_per_update"] == [2]  # one payload from each rank of the group
    assert engine["generated_prompts"] == ROUNDS * 4 * 2  # every prompt x n, on the one engine
    # Each round's requests are sampled at that round's tau_s (0.6, then 0.6 + 0.4 * 0.5 / (2/3)).
    taus = [
        json.loads(line)["rollout/tau_s"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert taus == pytest.approx([0.6, 0.9])
    assert engine["temperatures"] == [[pytest.approx(tau)] for tau in taus]
    final = {}
    for path in sorted((tmp_path / "run" / "hf_final").glob("*.safetensors")):
        final |= load_file(str(path))
    for tp_rank in (0, 1):  # the last sync loaded exactly the exported weights, on both TP ranks
        loaded = engine["loaded"][tp_rank]
        assert loaded.keys() == final.keys()
        for name, tensor in final.items():
            dtype, shape, raw = loaded[name]
            assert (dtype, shape) == (str(tensor.dtype), list(tensor.shape)), name
            assert bytes.fromhex(raw) == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name


def test_offline_mode_keeps_the_base_weights_for_evaluation(tiny_run_inputs, tmp_path):
    """Offline: the bank is answered once and no round refreshes the engine, so its memory is
    never released (SGLang keeps no CPU copy: released weights would be gone) and every
    validation generates from the base weights."""
    rank0, rank1 = _sglang_run(
        tiny_run_inputs,
        tmp_path,
        2,
        "train.mode=offline",
        f"eval.benchmarks={tiny_run_inputs / 'val.jsonl'}",
        "eval.every_n_rounds=1",
        "eval.n=1",
        "eval.max_questions=2",
    )
    assert rank0["rc"] == rank1["rc"] == 0
    (engine,) = rank0["engines"]
    # the bank, once; then one validation per round: nothing released, nothing reloaded
    assert [name for name, _ in engine["calls"]] == ["generate"] * (1 + ROUNDS)


def test_two_engines_share_the_rollout(tiny_run_inputs, tmp_path):
    ranks = _sglang_run(tiny_run_inputs, tmp_path, engine_tp=1)
    assert [r["rc"] for r in ranks] == [0, 0]
    engines = [r["engines"] for r in ranks]
    assert all(len(e) == 1 and e[0]["kwargs"]["tp_size"] == 1 for e in engines)
    generated = [e[0]["generated_prompts"] for e in engines]
    assert sum(generated) == ROUNDS * 4 * 2 and all(g > 0 for g in generated)
    for (engine,) in engines:
        names = [name for name, _ in engine["calls"]]
        updates = names.count("update_weights_from_tensor") // ROUNDS
        assert names == one_round(updates) * ROUNDS
        assert engine["payloads_per_update"] == [1]
    assert engines[0][0]["loaded"] == engines[1][0]["loaded"]  # both engines got the same weights


def test_disaggregated_servers_generate_and_receive_every_round(tiny_run_inputs, tmp_path):
    """rollout.placement=disaggregated: the loop generates over HTTP and broadcasts the new
    weights each round into an SGLang-shaped server that runs SGLang's own receiving code
    (tests/rollout/_sglang_http_server.py); after the run the server holds the exported weights."""
    import subprocess
    import time
    import urllib.request

    from mp import REPO_ROOT, free_port, run_python

    require_sglang()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "tests/rollout/_sglang_http_server.py"),
            str(port),
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/get_server_info", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "fake server did not start"
                time.sleep(0.5)
        run_python(
            "sept_megatron.cli",
            "train",
            f"model.hf_path={tiny_run_inputs / 'hf'}",
            f"data.train_files={tiny_run_inputs / 'train.jsonl'}",
            f"train.rounds={ROUNDS}",
            "train.prompts_per_round=4",
            "train.mini_batch_size=4",
            "train.micro_batch_size=2",
            "data.max_response_length=8",
            f"logging.run_dir={tmp_path / 'run'}",
            "logging.progress=false",
            "checkpoint.export_hf=true",
            "rollout.backend=sglang",
            "rollout.placement=disaggregated",
            f"rollout.server_urls=[{url}]",
            timeout=420,
        )
        dump = json.loads(urllib.request.urlopen(f"{url}/dump").read())
    finally:
        server.kill()
        server.wait(timeout=30)
    log = [route for route in dump["log"] if route != "update_weights_from_distributed"]
    # rank 0 opens the session, then stage 0's leader joins the weight group (once)
    assert log == (
        ["generate", "begin_weight_update", "init_weights_update_group", "end_weight_update", "flush_cache"]
        + ["generate", "begin_weight_update", "end_weight_update", "flush_cache"]
    )
    assert dump["log"].count("update_weights_from_distributed") >= ROUNDS
    final = {}
    for path in sorted((tmp_path / "run" / "hf_final").glob("*.safetensors")):
        final |= load_file(str(path))
    assert dump["loaded"].keys() == final.keys()
    for name, tensor in final.items():
        dtype, shape, raw = dump["loaded"][name]
        assert shape == list(tensor.shape), name
        assert bytes.fromhex(raw) == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name
