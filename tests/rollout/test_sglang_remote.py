"""The disaggregated SGLang client on CPU: HTTP generation over two servers and the NCCL-style
weight broadcast (gloo here) into SGLang's own receiving code (see _sglang_http_server.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest
from mp import REPO_ROOT, free_port, run_python
from sglang_source import require_sglang


@pytest.fixture(scope="module", autouse=True)
def _sglang():
    require_sglang()


def _wait_up(url: str, process, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fake SGLang server exited: {process.stdout.read()}")
        try:
            urllib.request.urlopen(f"{url}/get_server_info", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up in {timeout_s} s")


@pytest.mark.slow
def test_two_servers_generate_in_order_and_receive_weights_bitwise(tmp_path):
    servers, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            servers.append(
                subprocess.Popen(
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
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(urls, servers):
            _wait_up(url, process)
        out = tmp_path / "client.json"
        run_python("tests/rollout/_sglang_remote_client.py", *urls, str(out), timeout=300)
        result = json.loads(out.read_text())
        assert result["sent"] == 2
        for url in urls:
            dump = json.loads(urllib.request.urlopen(f"{url}/dump").read())
            assert dump["loaded"] == result["expected"]  # both servers, every byte
            assert dump["log"][:5] == [
                "init_weights_update_group",
                "begin_weight_update",
                "update_weights_from_distributed",
                "update_weights_from_distributed",
                "end_weight_update",
            ]
            assert dump["log"][5:7] == ["flush_cache", "generate"]
        # 6 requests (3 prompts x n=2), 3 per server, back in prompt order
        assert result["generations"] == [
            [[[4, 3, 2], "length"]] * 2,
            [[[6, 5], "length"]] * 2,
            [[[9, 8, 7], "length"]] * 2,
        ]
    finally:
        for process in servers:
            process.kill()
            process.wait(timeout=30)


def test_trainer_address_is_the_interface_that_routes_to_the_server(monkeypatch):
    import socket

    from sept_megatron.rollout.sglang_remote import ServerError, address_towards

    # /etc/hosts commonly maps the hostname to 127.0.1.1: a remote server would dial itself.
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    assert address_towards("http://127.0.0.1:30000") == "127.0.0.1"
    try:
        routed = address_towards("http://192.0.2.77:30000")  # TEST-NET-1: routed, never dialled
    except ServerError as error:  # a machine with no route but loopback
        pytest.skip(f"no non-loopback route here: {error}")
    assert not routed.startswith("127.")
    with pytest.raises(ValueError, match="rollout.server_urls"):
        address_towards("http://:30000")


class _InfoClient:
    """A server client answering ``/get_server_info`` with SGLang's own ``ServerArgs`` dict."""

    def __init__(self, model_path: str, **server_args):
        from sglang.srt.server_args import ServerArgs

        from sept_megatron.rollout.sglang_remote import ServerClient

        self.url = "http://node7:30000"
        self.info = ServerArgs(model_path=model_path, **server_args).resolved_dict()
        self.quantization = ServerClient.quantization.__get__(self)

    def request(self, route, payload=None, method="POST"):
        assert route == "get_server_info" and method == "GET"
        return self.info


def test_disaggregated_fp8_needs_servers_that_serve_fp8(tmp_path):
    from hf_tiny import make_tiny_model, make_tokenizer

    from sept_megatron.rollout.sglang_engine import prepare_fp8_model_dir
    from sept_megatron.rollout.sglang_remote import ServerError, SGLangRemoteEngine

    tokenizer = make_tokenizer(tmp_path / "tok")
    make_tiny_model("qwen2", tokenizer).save_pretrained(tmp_path / "bf16")
    fp8_dir = prepare_fp8_model_dir(str(tmp_path / "bf16"), str(tmp_path / "fp8"))
    with pytest.raises(
        ServerError,
        match=r"rollout.weights=fp8 .*node7:30000.*bf16.*"
        r"quantization=None.*rollout.weights=native",
    ):
        SGLangRemoteEngine([], clients=[_InfoClient(str(tmp_path / "bf16"))], weights="fp8")
    SGLangRemoteEngine([], clients=[_InfoClient(fp8_dir)], weights="fp8")  # its config says fp8
    SGLangRemoteEngine([], clients=[_InfoClient("/elsewhere", quantization="fp8")], weights="fp8")
    SGLangRemoteEngine([], clients=[_InfoClient(str(tmp_path / "bf16"))])  # native: no check
