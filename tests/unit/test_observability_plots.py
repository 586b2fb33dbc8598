"""plot_run: PNG curves from a small metrics.jsonl."""

import json
import math

import pytest

from holderpo_megatron.observability.plots import PLOTS, main, plot_run

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, steps=12, with_gpu=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            r = {
                "step": s, "reward": 0.1 * s, "reward_std": 0.3, "accuracy": 0.05 * s, "response_length": 100 + s,
                "p": 1.0 + 0.1 * s, "rho_mean": 1.0, "rho_min": 0.5, "rho_max": 2.0 if s != 3 else None,
                "clip_frac": 0.01 * s, "kl": 0.001 * s, "entropy": 1.0 / s, "grad_norm": math.sqrt(s),
                "logprob_drift": 1e-3, "time/rollout": 2.0, "time/train": 1.0, "time/step": 3.2,
                "tokens_per_s": 500.0, "p_schedule": "linear",
            }
            if with_gpu:
                r["gpu/memory_used_gib"] = 10.0
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 13, "rew')  # a crashed run's torn last line


def test_plot_run_writes_a_non_empty_png_per_logged_quantity(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    files = plot_run(run)
    expected = [s for s in PLOTS if s != "gpu_memory"]  # no GPU stats were logged
    assert [f.stem for f in files] == expected
    for f in files:
        assert f.parent == run / "plots"
        data = f.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 2000, f


def test_plot_run_into_another_directory_and_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, steps=3, with_gpu=True)
    files = plot_run(run, tmp_path / "out")
    assert (tmp_path / "out" / "gpu_memory.png").is_file() and len(files) == len(PLOTS)
    assert main([str(run), "--out", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == len(PLOTS)
    assert str(tmp_path / "cli" / "reward.png") in capsys.readouterr().out


def test_plot_run_refuses_a_directory_without_metrics(tmp_path, capsys):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
