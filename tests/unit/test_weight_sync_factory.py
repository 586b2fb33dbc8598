"""Transport choice from the topology, the factory's start-up line, SyncReport's metrics, and the
engine protocol of a whole sync against a recording engine: no SGLang, no Megatron."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from holderpo_megatron.weight_sync import (DiskTransport, DistributedTransport, StateDictSource, SyncReport,
                                           SyncTopology, TensorTransport, choose_transport, make_weight_synchronizer)

LOGGER = "holderpo_megatron.weight_sync.factory"

TOPOLOGIES = [
    # (case, topology, auto's choice)
    ("one stage on the engine's host", SyncTopology.from_hosts(["gpu-a"], "gpu-a"), "tensor"),
    ("TP2 x PP2 on one 8-GPU node", SyncTopology.from_layout(stage_senders=[0, 2], nproc_per_node=8, tp=2), "tensor"),
    ("PP2 stages on two nodes", SyncTopology.from_layout(stage_senders=[0, 4], nproc_per_node=4), "distributed"),
    ("stage 1 on another host", SyncTopology.from_hosts(["gpu-a", "gpu-b"], "gpu-a", tp=4), "distributed"),
    ("hosts given override the node arithmetic",
     SyncTopology.from_layout(stage_senders=[0, 1], nproc_per_node=8, hosts=["gpu-a", "gpu-b"]), "distributed"),
    ("engine with another rank, on another node",
     SyncTopology.from_layout(stage_senders=[0], nproc_per_node=2, engine_rank=2), "distributed"),
    ("servers on loopback", SyncTopology.from_hosts(["gpu-a"], "gpu-a", server_urls=["http://127.0.0.1:30000"]),
     "tensor"),
    ("servers on the engine's host by name",
     SyncTopology.from_hosts(["gpu-a"], "gpu-a", server_urls=["http://gpu-a:30000"]), "tensor"),
    ("remote servers", SyncTopology.from_hosts(["gpu-a"], "gpu-a",
                                               server_urls=["http://127.0.0.1:30000", "http://10.0.0.7:30000"]),
     "distributed"),
]


@pytest.mark.parametrize("case,topology,want", TOPOLOGIES, ids=[c for c, _, _ in TOPOLOGIES])
def test_auto_picks_tensor_only_when_every_sender_is_on_the_engines_local_host(case, topology, want):
    assert choose_transport(topology) == want, f"{case}: {topology.reason}"


def test_topology_fields_and_reasons():
    t = SyncTopology.from_layout(stage_senders=[0, 4, 8], nproc_per_node=4, tp=4)
    assert t.sender_hosts == ("node0", "node1", "node2") and t.engine_host == "node0"
    assert (t.pp_size, t.tp_size, t.engine_remote, t.senders_on_engine_host) == (3, 4, False, False)
    assert t.reason == ("not every stage sender is on the engine's host 'node0': stage 1 on 'node1', "
                        "stage 2 on 'node2' (pp=3, tp=4)")
    assert "the engine is remote" in SyncTopology.from_hosts(["a"], "a", server_urls=["http://b:1"]).reason
    assert SyncTopology.from_hosts(["a"], "a").reason == "every stage sender is on the engine's host 'a' (pp=1, tp=1)"
    for kwargs, match in [(dict(sender_hosts=(), engine_host="a"), "sender_hosts=()"),
                          (dict(sender_hosts=("a", ""), engine_host="a"), "sender_hosts"),
                          (dict(sender_hosts=("a",), engine_host=""), "engine_host=''"),
                          (dict(sender_hosts=("a",), engine_host="a", tp_size=0), "tp_size=0")]:
        with pytest.raises(ValueError, match=match):
            SyncTopology(**kwargs)
    with pytest.raises(ValueError, match="nproc_per_node=0"):
        SyncTopology.from_layout(stage_senders=[0], nproc_per_node=0)
    with pytest.raises(ValueError, match="stage_senders is empty"):
        SyncTopology.from_layout(stage_senders=[], nproc_per_node=1)


class RecordingEngine:
    """What the synchroniser asks of an engine, recorded in order; tensor updates land in ``weights``."""

    dtype = torch.float32

    def __init__(self, model_path: str = "", fail_on_update: bool = False):
        self.calls: list[str] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.fail_on_update = fail_on_update
        self.config = type("Config", (), {"model_path": model_path})()

    def __getattr__(self, name):  # pause_generation, begin_weight_update, flush_cache, ...
        return lambda *a, **k: self.calls.append(name)

    def update_weights_from_tensors(self, named, flush_cache=False):
        if self.fail_on_update:
            raise RuntimeError("engine refused the bucket")
        self.weights.update({n: t.clone() for n, t in named})
        self.calls.append(f"update_weights_from_tensors(flush_cache={flush_cache})")

    def update_weights_from_bucket(self, bucket, flush_cache=False):
        self.update_weights_from_tensors(bucket.tensors(), flush_cache)

    def set_weight_version(self, version):
        self.calls.append(f"set_weight_version({version})")

    def update_weights_from_disk(self, path):
        self.calls.append(f"update_weights_from_disk({path})")
        self.disk_path = path


def _state():
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(8, 4, generator=g),
            "model.norm.weight": torch.randn(4, generator=g), "lm_head.weight": torch.randn(8, 4, generator=g)}


def test_make_weight_synchronizer_builds_the_choice_and_logs_it_once(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger=LOGGER)
    src, engine = StateDictSource(_state()), RecordingEngine(model_path=str(tmp_path))
    two_hosts = SyncTopology.from_hosts(["gpu-a", "gpu-b"], "gpu-a")
    sync = make_weight_synchronizer(src, engine, dtype=torch.float32, topology=two_hosts)
    assert isinstance(sync, DistributedTransport)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == ["weight sync: transport=distributed (auto: not every stage sender is on the engine's host "
                     "'gpu-a': stage 1 on 'gpu-b' (pp=2, tp=1))"]
    assert caplog.records[-1].levelno == logging.INFO
    caplog.clear()
    one_host = SyncTopology.from_hosts(["gpu-a"], "gpu-a")
    assert isinstance(make_weight_synchronizer(src, engine, dtype=torch.float32, topology=one_host), TensorTransport)
    # disk only by name, whatever the topology
    (tmp_path / "config.json").write_text("{}")
    disk = make_weight_synchronizer(src, engine, dtype=torch.float32, transport="disk", topology=one_host,
                                    root=str(tmp_path / "w"))
    assert isinstance(disk, DiskTransport)
    assert [r.getMessage() for r in caplog.records][-1] == "weight sync: transport=disk (asked for)"
    # tensor across hosts cannot work: refused at start-up, not at the first sync
    with pytest.raises(ValueError, match="transport='tensor' needs every stage sender on the engine's host"):
        make_weight_synchronizer(src, engine, dtype=torch.float32, transport="tensor", topology=two_hosts)
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert isinstance(make_weight_synchronizer(src, engine, dtype=torch.float32), TensorTransport)
    assert any("no topology given" in r.getMessage() for r in caplog.records)


def test_sync_report_metrics():
    report = SyncReport("tensor", version=3, seconds=0.5, bytes=2_000_000_000, tensors=10, buckets=2)
    d = report.to_dict()
    assert d == {"weight_sync/seconds": 0.5, "weight_sync/gb_per_s": 4.0, "weight_sync/bytes": 2e9,
                 "weight_sync/tensors": 10.0, "weight_sync/buckets": 2.0}
    assert set(SyncReport("disk", 1, 0.0, 0, 0, 0).to_dict(prefix="ws.")) >= {"ws.seconds", "ws.gb_per_s", "ws.bytes"}
    assert SyncReport("disk", 1, 0.0, 5, 1, 1).gb_per_s == float("inf")


@pytest.mark.parametrize("zero_copy", [True, False])
def test_a_tensor_sync_brackets_the_update_and_stamps_the_version(zero_copy):
    state = _state()
    engine = RecordingEngine()
    sync = make_weight_synchronizer(StateDictSource(state), engine, dtype=torch.float32, transport="tensor",
                                    bucket_bytes=64, zero_copy=zero_copy)
    report = sync.sync(7)
    sync.close()
    assert engine.calls == ["pause_generation", "begin_weight_update",
                            "update_weights_from_tensors(flush_cache=False)",
                            "update_weights_from_tensors(flush_cache=False)",
                            "update_weights_from_tensors(flush_cache=True)",  # the last bucket flushes the cache
                            "end_weight_update", "set_weight_version(7)", "continue_generation"]
    assert all(torch.equal(engine.weights[n], t) for n, t in state.items())
    assert (report.transport, report.version, report.tensors, report.buckets) == ("tensor", 7, 3, 3)
    assert report.bytes == sum(t.numel() * 4 for t in state.values()) and report.seconds > 0


def test_a_failed_transfer_still_ends_the_update_and_raises():
    engine = RecordingEngine(fail_on_update=True)
    sync = make_weight_synchronizer(StateDictSource(_state()), engine, dtype=torch.float32, transport="tensor")
    with pytest.raises(RuntimeError, match="engine refused the bucket"):
        sync.sync(1)
    assert engine.calls == ["pause_generation", "begin_weight_update", "end_weight_update"]


def test_a_disk_sync_writes_the_version_directory_and_loads_it_in_one_call(tmp_path):
    state = _state()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    engine = RecordingEngine(model_path=str(tmp_path / "hf"))
    sync = make_weight_synchronizer(StateDictSource(state), engine, dtype=torch.float32, transport="disk",
                                    bucket_bytes=64, root=str(tmp_path / "w"))
    for version in (4, 5):
        report = sync.sync(version)
        step_dir = tmp_path / "w" / f"step-{version}"
        assert engine.calls[-4:] == ["pause_generation", f"update_weights_from_disk({step_dir})",
                                     f"set_weight_version({version})", "continue_generation"]
        assert report.version == version and report.tensors == 3 and report.buckets == 3
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["step-5"]  # only the newest is kept
    loaded = {}
    for f in sorted((tmp_path / "w" / "step-5").glob("*.safetensors")):
        loaded.update(load_file(f))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[n], t) for n, t in state.items())
    assert (tmp_path / "w" / "step-5" / "config.json").is_file()
