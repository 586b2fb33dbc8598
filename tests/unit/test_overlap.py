"""rollout.overlap: refused where it cannot run (before launch), and the prefetch's hand-over between
the background generation and the training thread: results, failures, checkpoint position, shutdown."""

import threading
import time

import pytest

from holderpo_megatron.trainer.config import ConfigError, RunConfig, load_run_config
from holderpo_megatron.trainer.config_loader import from_dict
from holderpo_megatron.trainer.overlap import RolloutPrefetch

SEPARATE = {"mode": "servers", "placement": "separate", "engine_gpus_per_node": 1}


@pytest.mark.parametrize("rollout,extra,match", [
    ({"overlap": True}, {}, "rollout.overlap=true needs rollout.placement=separate .*; got placement=colocated"),
    ({**SEPARATE, "mode": "embedded", "overlap": True}, {},
     "rollout.overlap=true needs rollout.mode=servers .*; got mode=embedded"),
    ({**SEPARATE, "overlap": True}, {"agent": {"env": "alfworld"}},
     "rollout.overlap=true generates single-turn prompt batches; agent.env=alfworld is not supported"),
])
def test_overlap_is_refused_where_it_cannot_run(rollout, extra, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(RunConfig, {"rollout": rollout, **extra})


def test_overlap_forces_the_engines_logprobs_as_old():
    cfg = from_dict(RunConfig, {"rollout": {**SEPARATE, "overlap": True}})
    assert cfg.rollout.overlap and not cfg.rollout.use_rollout_logprobs and cfg.rollout.old_logprobs_from_engine
    assert not from_dict(RunConfig, {"rollout": SEPARATE}).rollout.old_logprobs_from_engine
    assert from_dict(RunConfig, {"rollout": {"use_rollout_logprobs": True, "drift_max": 0.05}}).rollout.old_logprobs_from_engine
    assert not load_run_config("examples/recipes/tiny-cpu.yaml").rollout.overlap  # off by default


def test_cli_refuses_colocated_overlap_in_one_line_before_launch(capsys):
    from holderpo_megatron.cli import main

    assert main(["train", "--config", "examples/recipes/tiny-cpu.yaml", "rollout.overlap=true"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("holderpo train: bad config: rollout.overlap=true needs rollout.placement=separate"), err
    assert "\n" not in err and "launching" not in cap.out


def test_a_batch_made_in_the_background_is_taken_once_with_its_data_position():
    p = RolloutPrefetch()
    started, release = threading.Event(), threading.Event()

    def produce():
        started.set()
        release.wait(10)
        return ["samples of step 3", threading.current_thread().name]

    p.submit(3, {"index": 12}, produce)
    assert started.wait(10) and p.holds(3) and not p.holds(2)
    with pytest.raises(RuntimeError, match="step 3's batch is still held; step 4 cannot be submitted"):
        p.submit(4, {"index": 16}, produce)
    assert p.data_state == {"index": 12}  # the position a checkpoint saves while the batch is in flight
    threading.Timer(0.2, release.set).start()
    assert p.wait() >= 0.1  # the main thread waited for it
    got = p.take(3)
    assert got[0] == "samples of step 3" and got[1] != threading.current_thread().name
    assert not p.holds(3) and p.data_state is None
    with pytest.raises(RuntimeError, match="rollout prefetch holds step None, not step 3"):
        p.take(3)


def test_other_ranks_hold_the_step_without_a_thread():
    p = RolloutPrefetch()
    assert p.wait() < 1.0  # nothing in flight (the last step, a run of one step): no wait
    p.submit(1, {"index": 4}, None)
    assert p.holds(1) and p.wait() < 1.0 and p.take(1) is None
    p.submit(2, {"index": 8}, None)  # taken, the slot is free for the next step on every rank
    assert p.holds(2) and not p.holds(1)


def test_a_failed_background_generation_is_raised_by_take_naming_the_step():
    p = RolloutPrefetch()

    def produce():
        raise ConnectionError("server http://127.0.0.1:1 stopped answering")

    p.submit(2, {}, produce)
    p.wait()
    with pytest.raises(RuntimeError, match=r"generating step 3's batch in the background failed: ConnectionError: "
                                           r"server http://127.0.0.1:1 stopped answering"):
        p.take(2)
    p.submit(3, {}, lambda: "next")  # the prefetch is free again
    assert p.take(3) == "next"


def test_close_does_not_wait_for_a_stuck_generation(caplog):
    p = RolloutPrefetch()
    never = threading.Event()
    p.submit(5, {}, lambda: never.wait(60))
    t0 = time.perf_counter()
    p.close(join_s=0.2)
    assert time.perf_counter() - t0 < 5
    assert "background generation of step 6 was still running" in caplog.text
    stuck = [t for t in threading.enumerate() if t.name == "rollout-step5"]
    assert stuck and all(t.daemon for t in stuck)  # it cannot hold the process at exit
    with pytest.raises(RuntimeError, match="submit of step 6 after close"):
        p.submit(6, {}, None)
    never.set()
    p.close()  # again: a no-op


def test_staleness_counts_versions_behind_the_trained_weights_from_a_samples_oldest_token():
    import torch

    from holderpo_megatron.rollout.interface import Sample
    from holderpo_megatron.trainer.loop import staleness_metrics

    def sample(version, spans=()):
        return Sample(0, 0, [1], [2, 3], torch.zeros(2), "stop", weight_version=version, weight_versions=list(spans))

    # one sample made by version 4, one whose weights changed mid-way (3 then 4), one on-policy
    got = staleness_metrics([sample(4), sample(4, [(3, 0, 1), (4, 1, 2)]), sample(5)], train_version=5)
    assert got == {"rollout/staleness_mean": 1.0, "rollout/staleness_max": 2.0,
                   "rollout/weight_version_min": 3.0, "rollout/weight_version_max": 5.0}
