"""metrics.jsonl, TensorBoard, wandb (faked), NVML, the phase timer, the progress bar, the config."""

import io
import json
import logging
import sys
import types

import numpy as np
import pytest
import torch

from holderpo_megatron.observability import (
    GpuMonitor,
    MetricsLogger,
    ObservabilityConfig,
    PhaseTimer,
    StepProgress,
    read_metrics,
)

QUIET = ObservabilityConfig(tensorboard=False, progress=False, gpu_stats=False)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------- config
def test_config_validates_and_refuses_unknown_keys():
    assert ObservabilityConfig.from_dict({"log_every": 5, "wandb": True}).log_every == 5
    with pytest.raises(ValueError, match="log_every must be an int >= 1, got 0"):
        ObservabilityConfig(log_every=0)
    with pytest.raises(ValueError, match="wandb_mode must be one of"):
        ObservabilityConfig(wandb_mode="cloud")
    with pytest.raises(ValueError, match="tensorboard must be true or false"):
        ObservabilityConfig(tensorboard="yes")
    with pytest.raises(ValueError, match=r"unknown logging option\(s\) \['tensorbord'\]"):
        ObservabilityConfig.from_dict({"tensorbord": True})
    assert ObservabilityConfig.from_dict(ObservabilityConfig().to_dict()) == ObservabilityConfig()


# ---------------------------------------------------------------- timer
def test_phase_timer_accumulates_nests_and_resets():
    now = [0.0]
    t = PhaseTimer(clock=lambda: now[0])
    with t("rollout"):
        now[0] += 2.0
    with t("train"):
        with t("backward"):
            now[0] += 1.0
        now[0] += 0.5
    with t("rollout"):
        now[0] += 1.0
    assert t.pop() == {"rollout": 3.0, "train": 1.5, "backward": 1.0}
    assert t.pop() == {}
    with pytest.raises(ValueError, match="already being timed"):
        with t("a"):
            with t("a"):
                pass
    with pytest.raises(ValueError, match="without '/'"):
        with t("a/b"):
            pass


def test_phase_timer_records_time_when_the_phase_raises_and_synchronises():
    syncs = []
    t = PhaseTimer(synchronize=lambda: syncs.append(1))
    with pytest.raises(RuntimeError):
        with t("score"):
            raise RuntimeError("boom")
    assert "score" in t.totals() and len(syncs) == 2


# ---------------------------------------------------------------- metrics.jsonl
def test_records_are_flushed_each_step_with_phase_times_and_throughput(tmp_path):
    logger = MetricsLogger(tmp_path, QUIET)
    with logger.timer("rollout"):
        pass
    rec = logger.log(1, {"reward": torch.tensor(0.5), "accuracy": np.float32(0.25), "p": 1.5, "kl": float("nan"),
                         "rho_min": float("inf"), "p_schedule": "linear", "update_ok": True}, tokens=1000)
    # visible before close: a crash keeps every logged step
    (got,) = _lines(tmp_path / "metrics.jsonl")
    assert got == rec
    assert got["step"] == 1 and got["reward"] == 0.5 and got["accuracy"] == 0.25 and got["p_schedule"] == "linear"
    assert got["kl"] is None and got["rho_min"] is None  # strict JSON: non-finite -> null
    assert got["time/rollout"] >= 0 and got["time/step"] >= got["time/rollout"]
    assert got["tokens"] == 1000 and got["tokens_per_s"] > 0
    logger.log(2, {"reward": 0.7})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "time/rollout" not in _lines(tmp_path / "metrics.jsonl")[1]  # timer totals are per step


def test_bad_metrics_are_refused(tmp_path):
    with MetricsLogger(tmp_path, QUIET) as logger:
        with pytest.raises(ValueError, match="must be a scalar, got a tensor of shape \\(2,\\)"):
            logger.log(1, {"reward": torch.ones(2)})
        with pytest.raises(ValueError, match="'step' is not allowed"):
            logger.log(1, {"step": 3})
        with pytest.raises(ValueError, match="must be a number"):
            logger.log(1, {"x": [1, 2]})


def test_log_every_keeps_the_first_and_last_step(tmp_path):
    cfg = ObservabilityConfig(tensorboard=False, progress=False, gpu_stats=False, log_every=3)
    with MetricsLogger(tmp_path, cfg, total_steps=7) as logger:
        for step in range(1, 8):
            logger.log(step, {"reward": step})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 3, 6, 7]


def test_evaluation_metrics_join_their_step_without_disturbing_it(tmp_path):
    cfg = ObservabilityConfig(tensorboard=False, progress=False, gpu_stats=False, log_every=5)
    with MetricsLogger(tmp_path, cfg) as logger:
        logger.log(1, {"reward": 0.1})
        assert logger.log(2, {"reward": 0.2}) is None  # skipped by log_every
        # the same step again (an evaluation after the step): always written
        assert logger.log(2, {"eval/accuracy": 0.5})["eval/accuracy"] == 0.5
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]

    with MetricsLogger(tmp_path / "b", QUIET) as logger:
        with logger.timer("rollout"):
            pass
        extra = logger.log_extra(1, {"eval/accuracy": 0.7})
        own = logger.log(1, {"reward": 0.1, "accuracy": 0.2})
        again = logger.log(1, {"eval/reward": 0.9, "accuracy": 0.3})
    assert "time/step" not in extra and "time/rollout" not in extra
    assert "time/rollout" in own and "time/step" in own  # log_extra neither popped the timer nor the clock
    assert "time/step" not in again
    (r,) = read_metrics(tmp_path / "b")  # one step's records merged, the later value of a key wins
    assert r["reward"] == 0.1 and r["eval/accuracy"] == 0.7 and r["eval/reward"] == 0.9 and r["accuracy"] == 0.3


def test_only_rank_zero_writes(tmp_path):
    with MetricsLogger(tmp_path / "r1", QUIET, rank=1) as logger:
        with logger.timer("rollout"):
            pass
        assert logger.log(1, {"reward": 1.0}) is None
    assert not (tmp_path / "r1").exists()


def test_resume_truncates_later_steps_and_appends(tmp_path):
    with MetricsLogger(tmp_path, QUIET) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward": step})
    with pytest.raises(ValueError, match="already holds 5 records .* pass resume_step"):
        MetricsLogger(tmp_path, QUIET)
    with MetricsLogger(tmp_path, QUIET, resume_step=3) as logger:
        assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        logger.log(4, {"reward": 40})
    steps = [r["step"] for r in _lines(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert _lines(tmp_path / "metrics.jsonl")[-1]["reward"] == 40


def test_a_restart_before_the_logged_steps_keeps_every_record_aside(tmp_path, caplog):
    # a resume that found no usable state restarts at step 0: the 50 logged steps must survive
    with MetricsLogger(tmp_path, QUIET) as logger:
        for step in range(1, 51):
            logger.log(step, {"reward": step})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with caplog.at_level(logging.WARNING):
        with MetricsLogger(tmp_path, QUIET, resume_step=0) as logger:
            logger.log(1, {"reward": -1})
    assert [r["reward"] for r in _lines(tmp_path / "metrics.jsonl")] == [-1]
    kept = sorted(tmp_path.glob("metrics.jsonl.before-restart-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == before
    assert "the 50 records of later steps (up to step 50) will be logged again" in caplog.text
    assert kept[0].name in caplog.text and caplog.records[-1].levelno == logging.WARNING
    # a second restart keeps its own copy: nothing is overwritten
    with MetricsLogger(tmp_path, QUIET, resume_step=0):
        pass
    assert len(list(tmp_path.glob("metrics.jsonl.before-restart-*"))) == 2


def test_a_line_torn_by_a_crash_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 1}\n{"step": 2, "reward": 2}\n{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with MetricsLogger(tmp_path, QUIET, resume_step=2) as logger:
        logger.log(3, {"reward": 3})
    assert [r["step"] for r in _lines(path)] == [1, 2, 3]
    # a complete record without its newline is kept, and the next one starts on its own line
    path.write_text('{"step": 1, "reward": 1}')
    with MetricsLogger(tmp_path, QUIET, resume_step=1) as logger:
        logger.log(2, {"reward": 2})
    assert [r["step"] for r in _lines(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        read_metrics(path)


def test_tensorboard_scalars_are_written_and_purged_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = ObservabilityConfig(progress=False, gpu_stats=False)
    with MetricsLogger(tmp_path, cfg) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"reward": float(step), "p_schedule": "linear"})
    with MetricsLogger(tmp_path, cfg, resume_step=1) as logger:
        logger.log(2, {"reward": 20.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "p_schedule" not in acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 1.0), (2, 20.0)]


# ---------------------------------------------------------------- wandb
def test_wandb_enabled_without_the_package_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" raises ImportError
    cfg = ObservabilityConfig(tensorboard=False, progress=False, gpu_stats=False, wandb=True)
    with pytest.raises(ImportError, match="pip install wandb .*logging.wandb: false"):
        MetricsLogger(tmp_path, cfg)


def test_wandb_offline_run_gets_every_record_and_keeps_its_id_on_resume(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    fake = types.SimpleNamespace(init=lambda **kw: calls["init"].append(kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = ObservabilityConfig(tensorboard=False, progress=False, gpu_stats=False, wandb=True, wandb_project="hp")
    with MetricsLogger(tmp_path, cfg, run_config={"lr": 1e-6}) as logger:
        logger.log(1, {"reward": 0.5, "p_schedule": "linear"})
    with MetricsLogger(tmp_path, cfg, resume_step=1) as logger:
        logger.log(2, {"reward": 0.6})
    first, second = calls["init"]
    assert first["mode"] == "offline" and first["project"] == "hp" and first["config"] == {"lr": 1e-6}
    assert first["dir"] == str(tmp_path) and first["id"] == second["id"]
    assert (tmp_path / "wandb_run_id").read_text().strip() == first["id"]
    assert [s for s, _ in calls["log"]] == [1, 2] and calls["finish"] == 2
    assert calls["log"][0][1]["reward"] == 0.5 and "p_schedule" not in calls["log"][0][1]


def test_real_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = ObservabilityConfig(tensorboard=False, progress=False, gpu_stats=False, wandb=True)
    with MetricsLogger(tmp_path, cfg, run_config={"lr": 1e-6}) as logger:
        logger.log(1, {"reward": 0.5, "p_schedule": "linear"})
    with MetricsLogger(tmp_path, cfg, resume_step=1) as logger:
        logger.log(2, {"reward": 0.6})
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) >= 1 and all(r.stat().st_size > 0 for r in runs)


# ---------------------------------------------------------------- GPU stats
def _fake_pynvml(init_error=None):
    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def init():
        if init_error:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    mod = types.SimpleNamespace(
        NVMLError=NVMLError, NVMLError_LibraryNotFound=NVMLError_LibraryNotFound, nvmlInit=init,
        nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 1024**3, total=80 * 1024**3),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97, memory=40),
    )
    return mod


def test_no_gpu_reports_nothing_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=True))
    with caplog.at_level(logging.INFO, logger="holderpo_megatron.observability.gpu"):
        gpu = GpuMonitor()
        assert gpu.sample() == {} and gpu.sample() == {}
    assert not gpu.available and "NVMLError_LibraryNotFound" in gpu.reason
    assert len([r for r in caplog.records if "GPU stats off" in r.getMessage()]) == 1


def test_gpu_stats_from_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = GpuMonitor()
    assert gpu.sample() == {"gpu/memory_used_gib": 3.0, "gpu/memory_total_gib": 80.0, "gpu/utilization_pct": 97.0}
    gpu.close()


def test_real_nvml_on_this_machine_never_fails():
    gpu = GpuMonitor()
    stats = gpu.sample()
    if torch.cuda.is_available():
        assert stats["gpu/memory_total_gib"] > 0
    else:
        assert stats == {} and gpu.reason
    gpu.close()


def test_the_logger_records_gpu_stats_when_present(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ObservabilityConfig(tensorboard=False, progress=False)
    with MetricsLogger(tmp_path, cfg) as logger:
        rec = logger.log(1, {"reward": 1.0})
    assert rec["gpu/utilization_pct"] == 97.0


# ---------------------------------------------------------------- progress
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_one_line_per_step_when_not_a_tty():
    now = [0.0]
    out = io.StringIO()
    bar = StepProgress(10, stream=out, clock=lambda: now[0])
    for step in (1, 2):
        now[0] += 3.0
        bar.update(step, {"reward_mean": 0.5, "grad_norm": 1.25, "p_schedule": "x"})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    # tqdm's own meter: 2 of 10 at 3 s/step, 8 left -> 0:24
    assert lines[1].startswith("step:  20%|##") and "2/10 [00:06<00:24" in lines[1], lines[1]
    assert "3.00s/step" in lines[1] and "reward_mean=0.5, grad_norm=1.25" in lines[1] and "p_schedule" not in lines[1]


def test_progress_redraws_in_place_on_a_tty_and_counts_only_this_process_steps():
    now = [0.0]
    out = _Tty()
    bar = StepProgress(100, start_step=50, stream=out, clock=lambda: now[0])
    now[0] += 10.0
    bar.update(51)
    now[0] += 10.0
    bar.update(52, {"reward_mean": 1.0})
    text = out.getvalue()
    assert text.count("\r") >= 3 and "\n" not in text  # drawn at 50, 51, 52 in place
    # 2 steps in 20 s (the 50 resumed ones do not count): 10 s/step, 48 left -> 8:00
    assert "52/100 [00:20<08:00, 10.00s/step, reward_mean=1]" in text, text
    bar.close()
    assert out.getvalue().endswith("\n")


def test_progress_disabled_and_bad_totals():
    out = io.StringIO()
    StepProgress(3, stream=out, enabled=False).update(1)
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        StepProgress(0)
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 3\], got 4"):
        StepProgress(3, start_step=4)


def test_logger_drives_the_progress_bar(tmp_path):
    out = io.StringIO()
    cfg = ObservabilityConfig(tensorboard=False, gpu_stats=False)
    with MetricsLogger(tmp_path, cfg, total_steps=4, progress_stream=out) as logger:
        logger.log(1, {"reward_mean": 0.25})
    assert out.getvalue().startswith("step:  25%") and "1/4 [" in out.getvalue() and "reward_mean=0.25" in out.getvalue()
