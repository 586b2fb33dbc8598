"""Rollout engine configuration, sampling parameters, the drift metric, the CPU shims: no SGLang needed."""

import logging
import sys

import pytest
import torch

from holderpo_megatron.rollout import LogprobDrift, Sample, SamplingParams, SGLangEngineConfig, logprob_drift


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"dtype": "float32", "architectures": ["LlamaForCausalLM"]}')
    return str(tmp_path)


@pytest.mark.parametrize("field,value,allowed", [
    ("mode", "ray", "embedded | servers"),
    ("device", "tpu", "auto | cpu | cuda"),
    ("dtype", "float64", "auto | float32 | bfloat16 | float16"),
    ("tp_size", 0, "an int >= 1"),
    ("mem_fraction_static", 1.5, r"None or a float in \(0, 1\)"),
    ("num_servers", 0, "an int >= 1"),
    ("base_port", 80, "0 .pick free ports. or 1024..65535"),
    ("request_timeout_s", float("nan"), "a finite number of seconds > 0"),
    ("max_retries", -1, "an int >= 0"),
    ("log_level", "loud", "debug | info | warning | error"),
    ("cpu_threads", 0, r"None \(the starter's count\) or an int >= 1"),
])
def test_bad_engine_config_names_the_field_and_what_is_allowed(model_dir, field, value, allowed):
    with pytest.raises(ValueError, match=rf"SGLangEngineConfig\.{field}=.* is invalid; allowed: {allowed}"):
        SGLangEngineConfig(model_path=model_dir, **{field: value})


def test_engine_config_cross_field_rules(model_dir, tmp_path):
    with pytest.raises(ValueError, match="model_path=.*an existing directory"):
        SGLangEngineConfig(model_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="server_urls=.*empty unless mode='servers'"):
        SGLangEngineConfig(model_path=model_dir, server_urls=("http://127.0.0.1:30000",))
    with pytest.raises(ValueError, match="server URL 'localhost:30000' is invalid"):
        SGLangEngineConfig(model_path=model_dir, mode="servers", server_urls=("localhost:30000",))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is invalid"):
            SGLangEngineConfig(model_path=model_dir, device="cuda")


def test_engine_config_resolves_cpu_defaults(model_dir):
    cfg = SGLangEngineConfig(model_path=model_dir, device="cpu", server_args={"chunked_prefill_size": 512})
    kw = cfg.server_args_dict()
    assert cfg.torch_dtype == torch.float32  # "auto": the checkpoint's dtype
    assert kw["attention_backend"] == "torch_native" and kw["disable_overlap_schedule"] is True
    assert kw["mem_fraction_static"] == 0.3 and kw["device"] == "cpu" and kw["chunked_prefill_size"] == 512
    # every engine we start has our holding weight loader, beside any the caller names
    from holderpo_megatron.rollout.engine_weights import HOLDING_LOADER
    from holderpo_megatron.rollout.sglang_launcher import _cli_args

    assert kw["custom_weight_loader"] == [HOLDING_LOADER]
    mine = SGLangEngineConfig(model_path=model_dir, device="cpu", server_args={"custom_weight_loader": ["my.loader"]})
    assert mine.server_args_dict()["custom_weight_loader"] == [HOLDING_LOADER, "my.loader"]
    # a list option reaches the server's command line value by value (argparse nargs), a dict as JSON
    assert _cli_args({"custom_weight_loader": ["a.b", "c.d"], "json_model_override_args": {"x": 1}}) == [
        "--custom-weight-loader", "a.b", "c.d", "--json-model-override-args", '{"x": 1}']


@pytest.mark.parametrize("kw,field", [
    (dict(n=0), "n"), (dict(temperature=-0.1), "temperature"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed=-3), "seed"),
])
def test_bad_sampling_params(kw, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* is invalid; allowed: "):
        SamplingParams(**kw)


def test_sample_seeds_differ_per_prompt_and_sample():
    p = SamplingParams(n=3, seed=10)
    assert [p.sample_seed(i, j) for i in range(2) for j in range(3)] == [10, 11, 12, 13, 14, 15]
    assert SamplingParams().sample_seed(0, 0) is None


def test_step_seeds_never_repeat_a_request_seed_across_steps():
    # the old base (run_seed * c + step) made step s+1 reuse 31 of step s's 32 request seeds
    from holderpo_megatron.rollout import step_seed

    for run_seed in (0, 1234, 2**31 - 1):
        seen: set[int] = set()
        for step in range(50):
            p = SamplingParams(n=8, seed=step_seed(run_seed, step))
            mine = {p.sample_seed(i, j) + turn * 1_000_003 for i in range(64) for j in range(8) for turn in range(4)}
            assert not mine & seen, f"run seed {run_seed}: step {step} reuses a request seed of an earlier step"
            assert max(mine) < 2**63  # SGLang keeps request seeds in an int64 tensor
            seen |= mine
    assert step_seed(1234, 3) != step_seed(1235, 3)


def test_sample_staleness():
    s = Sample(0, 0, [1], [2, 3], torch.zeros(2), "length", weight_version=4, weight_versions=[(3, 0, 1), (4, 1, 2)])
    assert s.is_mixed_version and s.is_stale(4)
    s.weight_versions = [(4, 0, 2)]
    assert not s.is_stale(4) and s.is_stale(5)


def test_logprob_drift_mean_max_and_warning(caplog):
    train = [torch.tensor([-1.0, -2.0, -0.5, -0.25]), torch.tensor([-3.0, -1.0])]  # whole-sequence scores
    rollout = [torch.tensor([-0.45, -0.35]), torch.tensor([-1.0])]  # response tokens only
    with caplog.at_level(logging.WARNING):
        d = logprob_drift(train, rollout, response_starts=[3, 2], threshold=0.2)
    assert isinstance(d, LogprobDrift) and d.num_tokens == 3
    assert d.max_abs == pytest.approx(0.1) and d.mean_abs == pytest.approx(0.05)
    assert not d.exceeded and not caplog.records
    with caplog.at_level(logging.WARNING):
        d = logprob_drift([torch.tensor([-1.0])], [torch.tensor([-1.5])], threshold=0.1)
    assert d.exceeded and "drift above threshold" in caplog.text
    assert d.to_dict()["rollout/logprob_drift_max"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sample 0: 2 trainer log-probs vs 1 rollout log-probs"):
        logprob_drift([torch.zeros(2)], [torch.zeros(1)])
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # None: no per-call warning (the loop judges the step's total)
        d = logprob_drift([torch.tensor([-1.0])], [torch.tensor([-1.5])], threshold=None)
    assert d.max_abs == pytest.approx(0.5) and not d.exceeded and not caplog.records


def test_cpu_shims_provide_exactly_what_sglang_calls():
    import importlib
    import sys

    from holderpo_megatron.rollout.sglang_cpu_shims import SITE

    sys.path.insert(0, SITE)
    try:
        for name in [m for m in sys.modules if m.split(".")[0] in ("sgl_kernel", "torchvision")]:
            del sys.modules[name]
        sk = importlib.import_module("sgl_kernel")
        tv = importlib.import_module("torchvision")
        req_to_token = torch.zeros(3, 8, dtype=torch.int32)
        sk.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), req_to_token, torch.tensor([1, 0]), torch.tensor([3, 3]),
                                        torch.tensor([10, 11, 20, 21, 22]), 8)
        assert req_to_token[2, 1:3].tolist() == [10, 11] and req_to_token[0, 0:3].tolist() == [20, 21, 22]
        assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")  # SGLang's AMX probe says no
        with pytest.raises(NotImplementedError, match="stand-in"):
            sk.silu_and_mul(torch.zeros(2))
        from torchvision.transforms import InterpolationMode
        assert InterpolationMode.BICUBIC.value == "bicubic"
        with pytest.raises(NotImplementedError, match="torchvision is a stand-in"):
            tv.transforms.functional.resize(None, 3)
    finally:
        sys.path.remove(SITE)
        for name in [m for m in sys.modules if m.split(".")[0] in ("sgl_kernel", "torchvision")]:
            del sys.modules[name]


# ------------------------------------------------------------------ API keys (issue 14)
class _Capture:
    """A local HTTP server that records each request's path and Authorization header."""

    def __init__(self, status: int = 200):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                seen.append((self.path, self.headers.get("Authorization")))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"success": true}')

            do_GET = do_POST = _answer

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_given_servers_get_the_configured_key_as_a_bearer_token(tmp_path):
    from holderpo_megatron.rollout.interface import RolloutEngineError
    from holderpo_megatron.rollout.sglang_backends import ServerBackend
    from holderpo_megatron.rollout.sglang_engine import SGLangEngine

    srv = _Capture()
    try:
        engine = SGLangEngine(SGLangEngineConfig(model_path=str(tmp_path / "remote"), mode="servers",
                                                 server_urls=(srv.url,), api_key="k-123"))
        engine._backends[0].flush_cache()
        ServerBackend(srv.url).flush_cache()
        assert srv.seen == [("/flush_cache", "Bearer k-123"), ("/flush_cache", None)]
        assert "k-123" not in repr(engine.config) and engine.config.to_dict()["api_key"] == "<redacted>"
    finally:
        srv.close()
    denied = _Capture(status=401)
    try:
        with pytest.raises(RolloutEngineError, match=r"HTTP 401.*set rollout.api_key or \$HOLDERPO_SGLANG_API_KEY"):
            ServerBackend(denied.url).flush_cache()
    finally:
        denied.close()


def test_launched_servers_get_a_random_key_never_on_the_command_line(tmp_path, monkeypatch):
    import json
    import os
    import stat

    from holderpo_megatron.rollout import sglang_launcher

    launched = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            cfg = cmd[cmd.index("--config") + 1]
            mode = stat.S_IMODE(os.stat(cfg).st_mode)
            launched.append((cmd, json.loads(open(cfg).read()), mode, cfg))
            self.pid = 0

        def poll(self):
            return None

    monkeypatch.setattr(sglang_launcher.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(sglang_launcher.SGLangServerProcess, "_wait_ready", lambda self, t: None)
    procs = [sglang_launcher.SGLangServerProcess({"model_path": "/m", "device": "cpu"}, log_dir=str(tmp_path))
             for _ in range(2)]
    (cmd_a, file_a, mode_a, path_a), (_, file_b, _, _) = launched
    assert procs[0].api_key == file_a["api-key"] and len(procs[0].api_key) >= 32
    assert file_a["api-key"] != file_b["api-key"]  # one key per server
    assert mode_a == 0o600 and not os.path.exists(path_a)  # private, and gone once the server started
    assert not any(procs[0].api_key in part for part in cmd_a)
    # the server dies with the process that started it: the bootstrap is given our PID
    assert cmd_a[1] == "-c" and "PR_SET_PDEATHSIG" in cmd_a[2] and cmd_a[3:5] == [str(os.getpid()),
                                                                                  "sglang.launch_server"]
    # processes sharing servers (a run's ranks) agree on one key and pass it
    shared = sglang_launcher.SGLangServerProcess({"model_path": "/m", "device": "cpu"}, log_dir=str(tmp_path),
                                                 api_key="agreed-key")
    assert shared.api_key == "agreed-key" and launched[-1][1]["api-key"] == "agreed-key"
    with pytest.raises(ValueError, match="pass the API key as api_key=, not in server_args"):
        sglang_launcher.SGLangServerProcess({"model_path": "/m", "api_key": "x"}, log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="server_args must not set api_key: the key goes in api_key"):
        SGLangEngineConfig(model_path=str(tmp_path), server_args={"api_key": "x"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_dying_with_us_ends_when_we_are_killed():
    """How launched SGLang servers and torchrun end with their parent, even under SIGKILL."""
    import os
    import subprocess
    import time

    import psutil

    code = ("import subprocess, time\n"
            "from holderpo_megatron.rollout.sglang_launcher import module_command_dying_with_us as cmd\n"
            "p = subprocess.Popen(cmd('http.server', '0', '--bind', '127.0.0.1'), stdout=subprocess.DEVNULL,\n"
            "                     stderr=subprocess.DEVNULL)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(1.0)
    assert child.is_running() and "http.server" in " ".join(child.cmdline())
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        child.kill()
        raise AssertionError("the child outlived its parent by 10 s")
