"""SGLang HTTP servers started by our launcher: generation, weight sync over HTTP, a dead server.

One server for the module (the last test kills it). The death tests check that a request is
retried on a live server when its server is gone, and that when no live server is left the
caller gets an error naming the server, its exit code and its log tail, never a short batch.
"""

import os
import threading
import time

import pytest
import torch

from tests.integration.tiny_llama import hf_greedy, hf_model, hf_sequence_logprobs, require_sglang, save_tiny_llama

pytestmark = pytest.mark.integration
require_sglang()

from holderpo_megatron.rollout import (EngineDiedError, EngineStartError, SamplingParams, SGLangEngine,  # noqa: E402
                                       SGLangEngineConfig)
from holderpo_megatron.rollout.sglang_launcher import free_port  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_srv"))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    t0 = time.perf_counter()
    eng = SGLangEngine(SGLangEngineConfig(model_path=str(model_dir), mode="servers", dtype="float32",
                                          log_dir=str(tmp_path_factory.mktemp("sglang_logs")),
                                          request_timeout_s=120, max_retries=2))
    print(f"SGLang server started in {time.perf_counter() - t0:.1f} s at {eng.server_urls}")
    # the /dev/shm file each server's scheduler publishes its load in (SGLang never removes it):
    # found at start-up, removed when the server is stopped, here after the last test killed it
    snapshots = [path for b in eng._backends for path in b.process.load_snapshots]
    assert snapshots and all(os.path.exists(path) for path in snapshots), snapshots
    yield eng
    eng.shutdown()
    assert not any(os.path.exists(path) for path in snapshots), snapshots


def test_generation_over_http_equals_transformers(servers, model_dir):
    ref = hf_model(model_dir)
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12]]
    out = servers.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, n=2))
    for p, row in zip(prompts, out):
        want = hf_greedy(ref, p, 10)
        for s in row:
            assert s.output_ids == want and s.engine == servers.server_urls[0]
            lp = hf_sequence_logprobs(ref, p + s.output_ids)[len(p) - 1:]
            assert (s.logprobs.double() - lp).abs().max().item() <= 1e-3


@pytest.mark.parametrize("transport", ["tensor", "distributed", "disk"])
def test_weight_sync_into_a_server(servers, model_dir, transport):
    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.weight_sync import StateDictSource, make_weight_synchronizer

    ref = hf_model(model_dir)
    version = servers.weight_version + 1
    g = torch.Generator().manual_seed(100 + version)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()}
    sync = make_weight_synchronizer(StateDictSource(new, ModelArch.from_pretrained_dir(model_dir)), servers,
                                    dtype=torch.float32, transport=transport, bucket_bytes=128 * 1024)
    try:
        sync.sync(version)
    finally:
        sync.close()
    for name in ("model.layers.1.self_attn.v_proj.weight", "model.layers.2.mlp.gate_proj.weight", "lm_head.weight"):
        assert torch.equal(servers.get_weight(name), new[name]), name
    ref.load_state_dict(new)
    (s,), = servers.generate([[1, 5, 6, 7]], SamplingParams(temperature=0.0, max_new_tokens=6))
    assert s.weight_version == version and s.output_ids == hf_greedy(ref, [1, 5, 6, 7], 6)


def test_a_client_by_url_finds_our_weight_loader_on_a_server_we_started(servers):
    """A fleet's feeding rank reaches a server another rank launched by URL only: it asks the server
    whether it has our holding loader (``rollout/engine_weights.py``), and uses it if so."""
    from holderpo_megatron.rollout.sglang_backends import ServerBackend

    launched = servers._backends[0]
    by_url = ServerBackend(launched.url, timeout_s=60, api_key=launched.process.api_key)
    assert by_url.process is None and by_url._has_holding_loader()
    nowhere = ServerBackend(f"http://127.0.0.1:{free_port()}", timeout_s=5)
    assert not nowhere._has_holding_loader()  # unreachable: SGLang's own loader


def test_requests_on_a_dead_server_are_retried_on_a_live_one(servers, model_dir):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # a given server (ours, launched with a random key): reached with that key, as rollout.api_key would
    both = SGLangEngine(SGLangEngineConfig(model_path=str(model_dir), mode="servers", dtype="float32",
                                           server_urls=(servers.server_urls[0], dead), max_retries=1,
                                           api_key=servers._backends[0].process.api_key))
    out = both.generate([[1, k, k + 1] for k in range(3, 11)], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert len(out) == 8 and all(len(row) == 1 and len(row[0].output_ids) == 4 for row in out)
    assert all(row[0].engine == servers.server_urls[0] for row in out)
    assert both.health() == {servers.server_urls[0]: True, dead: False}


def test_a_server_that_cannot_start_reports_its_log_tail(model_dir, tmp_path):
    with pytest.raises(EngineStartError, match=r"(?s)exited with code .*last lines:.*no_such_backend"):
        SGLangEngine(SGLangEngineConfig(model_path=str(model_dir), mode="servers", dtype="float32",
                                        log_dir=str(tmp_path), attention_backend="no_such_backend"))


def test_a_server_dying_mid_generation_is_an_error_not_a_short_batch(servers):
    """Last in the module: it kills the module's server."""
    proc = servers._backends[0].process
    box = {}

    def run():
        try:
            box["out"] = servers.generate([[1, k] for k in range(3, 35)],
                                          SamplingParams(temperature=1.0, max_new_tokens=200, ignore_eos=True))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "generation finished before the server could be killed; make it longer"
    proc.proc.kill()
    t.join(120)
    assert not t.is_alive(), "generate() hung after its server died"
    assert "out" not in box, "a batch came back although its server died"
    err = box["err"]
    assert isinstance(err, EngineDiedError), repr(err)
    msg = str(err)
    for part in ("no partial batch is returned", proc.url, "exited with code", "last lines:"):
        assert part in msg, f"{part!r} missing from the error:\n{msg[:3000]}"
    assert servers.health() == {proc.url: False}
