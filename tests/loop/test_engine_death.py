"""An engine that dies or hangs mid-rollout, through the real CLI (rollout.placement=
disaggregated on CPU: an SGLang-shaped HTTP server, tests/rollout/_sglang_http_server.py, that
dies, or stops answering, on its third /generate request, i.e. during round 3's rollout).

The run exits non-zero with an error naming the server (dead: at once; hanging: within
rollout.timeout_minutes), and rerunning it against a healthy server resumes from its last
published checkpoint: round 1's (round 2's background save was still in flight and is never
published)."""

import subprocess
import sys
import time
import urllib.request

import pytest
from loop.test_train_cli import base_args, run_train
from mp import REPO_ROOT, free_port

sys.path.insert(0, str(REPO_ROOT / "tests" / "rollout"))
from sglang_source import require_sglang  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT_MINUTES = 0.1  # 6 s: the hanging case waits this long


def start_server(**fault: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(__import__("os").environ, **fault)
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "tests/rollout/_sglang_http_server.py"),
            str(port),
            str(free_port()),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/get_server_info", timeout=2).read()
            return server, url
        except OSError:
            assert server.poll() is None and time.time() < deadline, "fake server did not start"
            time.sleep(0.5)


def args(inputs, run_dir, url: str) -> list[str]:
    return base_args(inputs, run_dir, rounds=4) + [
        "train.prompts_per_round=4",
        "data.max_response_length=8",
        "checkpoint.export_hf=false",
        "rollout.backend=sglang",
        "rollout.placement=disaggregated",
        f"rollout.server_urls=[{url}]",
        f"rollout.timeout_minutes={TIMEOUT_MINUTES}",
    ]


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_engine_death_mid_rollout_stops_the_run_and_the_rerun_resumes(tiny_run_inputs, tmp_path, fault):
    require_sglang()
    run_dir = tmp_path / "run"
    server, url = start_server(FAKE_SGLANG_FAULT=fault, FAKE_SGLANG_FAULT_AT="3")
    try:
        start = time.monotonic()
        rc, output = run_train(args(tiny_run_inputs, run_dir, url), expect_ok=False)
        failed_after = time.monotonic() - start
    finally:
        server.kill()
        server.wait(timeout=30)
    assert rc == 1, output[-3000:]
    if fault == "die":
        assert f"sept-megatron train: error: {url}/generate" in output and "Traceback" not in output
    else:
        assert "rollout timed out: no answer from engine group 0" in output
        assert f"rollout.timeout_minutes={TIMEOUT_MINUTES:g}" in output
    assert failed_after < 400, failed_after  # start-up + round 1 on a loaded machine, not a hang
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "round_000001"

    server, url = start_server()
    try:
        _, output = run_train(args(tiny_run_inputs, run_dir, url))
    finally:
        server.kill()
        server.wait(timeout=30)
    assert "at round 1" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "round_000004"
