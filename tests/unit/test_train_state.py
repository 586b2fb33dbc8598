"""The train-state directory protocol with a fake payload: atomic commit, latest pointer, rotation,
incomplete directories, and a writer killed (os._exit) at every point of a commit."""

import json
import logging
import multiprocessing as mp
import os
import random
import shutil

import numpy as np
import pytest
import torch

from holderpo_megatron.checkpoint import train_state as ts
from holderpo_megatron.checkpoint.train_state import LATEST, TRAIN_STATE_MARKER, TrainStateDirectory


def _save_fake(d: TrainStateDirectory, step: int, keep_last=None, payload: bytes = b"weights"):
    tmp = d.staging(step)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "shard.bin").write_bytes(payload * step)
    (tmp / "common.json").write_text(json.dumps({"step": step}))
    final = d.commit(tmp, step, {"extra": {"cursor": step}})
    d.rotate(keep_last)
    return final


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_commit_renames_writes_marker_and_latest(tmp_path):
    d = TrainStateDirectory(tmp_path / "ckpt")
    final = _save_fake(d, 7)
    assert final == tmp_path / "ckpt" / "step_00000007"
    assert _names(d.root) == [".holderpo-root-id", "latest", "step_00000007"]  # no temporary left behind
    assert (d.root / LATEST).read_text() == "step_00000007\n"
    marker = d.read_marker(final)
    assert marker["step"] == 7 and marker["extra"] == {"cursor": 7}
    assert marker["files"] == {"sub/shard.bin": 7 * 7, "common.json": len(json.dumps({"step": 7}))}
    assert d.resolve_latest() == final


def test_rotation_keeps_the_newest_k(tmp_path):
    d = TrainStateDirectory(tmp_path)
    for s in (1, 2, 3, 4, 5):
        _save_fake(d, s, keep_last=2)
    assert d.complete_steps() == [4, 5]
    assert d.resolve_latest().name == "step_00000005"
    for s in (6, 7):
        _save_fake(d, s, keep_last=None)
    assert d.complete_steps() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
        d.rotate(0)


def test_rotation_never_deletes_the_state_latest_names(tmp_path):
    d = TrainStateDirectory(tmp_path)
    for s in (1, 2, 3):
        _save_fake(d, s)
    (tmp_path / LATEST).write_text("step_00000001\n")  # rolled back by hand
    assert d.rotate(1) == [2]
    assert d.complete_steps() == [1, 3]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    d = TrainStateDirectory(tmp_path)
    _save_fake(d, 3, payload=b"a")
    _save_fake(d, 3, payload=b"bb")
    assert (tmp_path / "step_00000003" / "sub" / "shard.bin").read_bytes() == b"bb" * 3
    assert _names(tmp_path) == [".holderpo-root-id", "latest", "step_00000003"]


def test_only_what_this_roots_writer_left_unfinished_is_removed(tmp_path, caplog):
    d = TrainStateDirectory(tmp_path)
    for s in (1, 2):
        _save_fake(d, s)
    # a crash while writing step 3: its (stamped) temporary directory is left
    (d.staging(3) / "sub.bin").write_bytes(b"half")
    # a rotation of ours that died mid-delete
    shutil.copytree(tmp_path / "step_00000001", tmp_path / ".deleting.step_00000000")
    # someone else's hidden directory, and an empty one (nothing to lose)
    (tmp_path / ".incomplete.step_00000009").mkdir()
    (tmp_path / ".incomplete.step_00000009" / "theirs.bin").write_bytes(b"x")
    (tmp_path / ".incomplete.step_00000008").mkdir()
    with caplog.at_level(logging.WARNING):
        removed = d.cleanup_incomplete()
    assert sorted(p.name for p in removed) == [
        ".deleting.step_00000000", ".incomplete.step_00000003", ".incomplete.step_00000008"]
    assert ".incomplete.step_00000009 was not written by this checkpoint root's writer" in caplog.text
    assert _names(tmp_path) == [".holderpo-root-id", ".incomplete.step_00000009", "latest", "step_00000001",
                                "step_00000002"]
    assert d.resolve_latest().name == "step_00000002"


def test_step_directories_placed_by_hand_are_never_deleted_and_refuse_the_resume(tmp_path):
    d = TrainStateDirectory(tmp_path)
    for s in (1, 2):
        _save_fake(d, s)
    # a newer step directory without a marker (copied by hand, or a foreign tool)
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / "x.bin").write_bytes(b"x")
    assert d.cleanup_incomplete() == []
    with pytest.raises(ts.AmbiguousTrainState, match=r"latest names step_00000002, but newer step directories are "
                       r"there: step_00000004 \(has no valid train_state.json.*nothing was changed: move them out"):
        d.resolve_latest()
    assert (tmp_path / "step_00000004" / "x.bin").read_bytes() == b"x"
    shutil.rmtree(tmp_path / "step_00000004")
    # a complete state of another run copied in, newer than latest
    other = TrainStateDirectory(tmp_path / "other")
    _save_fake(other, 5)
    shutil.copytree(other.root / "step_00000005", tmp_path / "step_00000005")
    with pytest.raises(ts.AmbiguousTrainState, match=r"step_00000005 \(is complete, not written by this root\)"):
        d.resolve_latest()
    # rolling latest back by hand while newer states of our own are there: refused too, never deleted
    shutil.rmtree(tmp_path / "step_00000005")
    _save_fake(d, 3)
    (tmp_path / LATEST).write_text("step_00000001\n")
    with pytest.raises(ts.AmbiguousTrainState, match=r"latest names step_00000001.*step_00000002 \(is complete\); "
                       r"step_00000003"):
        d.resolve_latest()
    assert d.complete_steps() == [1, 2, 3]
    # rotation deletes only this root's own states
    shutil.copytree(other.root / "step_00000005", tmp_path / "step_00000000")
    (tmp_path / LATEST).write_text("step_00000003\n")
    assert d.rotate(1) == [1, 2]
    assert d.complete_steps() == [0, 3]
    # a step saved where a foreign directory stands moves it aside, never deletes it
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / "x.bin").write_bytes(b"x")
    _save_fake(d, 4)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("step_00000004.displaced-")]
    assert len(aside) == 1 and (aside[0] / "x.bin").read_bytes() == b"x"
    # so does a foreign temporary directory in the way of a save
    (tmp_path / ".incomplete.step_00000005").mkdir()
    (tmp_path / ".incomplete.step_00000005" / "x.bin").write_bytes(b"x")
    _save_fake(d, 5)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".incomplete.step_00000005.displaced-")]
    assert len(aside) == 1 and (aside[0] / "x.bin").read_bytes() == b"x"
    # nothing committed, yet a step directory is there: refused, not deleted
    fresh = TrainStateDirectory(tmp_path / "fresh")
    (fresh.root / "step_00000007").mkdir(parents=True)
    with pytest.raises(ts.AmbiguousTrainState, match="there is no committed state to resume from"):
        fresh.resolve_latest()


def test_a_save_interrupted_before_latest_moved_is_completed(tmp_path, caplog):
    d = TrainStateDirectory(tmp_path)
    _save_fake(d, 1)
    latest_before = (tmp_path / LATEST).read_text()
    _save_fake(d, 2)
    (tmp_path / LATEST).write_text(latest_before)  # as if the writer died before os.replace
    os.utime(tmp_path / LATEST, (0, 0))
    assert d.resolve_latest(finish_interrupted=False).name == "step_00000002"
    assert (tmp_path / LATEST).read_text() == latest_before  # a check changes nothing
    with caplog.at_level(logging.WARNING):
        assert d.resolve_latest().name == "step_00000002"
    assert "completing that commit" in caplog.text
    assert (tmp_path / LATEST).read_text() == "step_00000002\n"


def test_missing_or_stale_latest_falls_back_to_the_newest_complete_state(tmp_path, caplog):
    d = TrainStateDirectory(tmp_path)
    assert d.resolve_latest() is None  # empty root
    assert TrainStateDirectory(tmp_path / "absent").resolve_latest() is None
    for s in (1, 2):
        _save_fake(d, s)
    (tmp_path / LATEST).unlink()
    assert d.resolve_latest().name == "step_00000002"
    (tmp_path / LATEST).write_text("step_00000009\n")  # names a state that is gone
    with caplog.at_level(logging.WARNING):
        assert d.resolve_latest().name == "step_00000002"
    assert "names step_00000009, which is missing: resuming from step_00000002, the newest complete state" \
        in caplog.text
    (tmp_path / LATEST).write_text("garbage\n")
    with pytest.raises(ValueError, match="not a step_NNNNNNNN directory"):
        d.resolve_latest()


def test_latest_naming_a_missing_state_with_nothing_else_says_the_run_starts_over(tmp_path, caplog):
    (tmp_path / LATEST).write_text("step_00000005\n")
    with caplog.at_level(logging.WARNING):
        assert TrainStateDirectory(tmp_path).resolve_latest() is None
    assert "names step_00000005, which is missing, and no other complete state is there: this run starts from " \
           "step 0" in caplog.text
    assert "instead" not in caplog.text


def test_a_damaged_state_is_not_loaded(tmp_path):
    d = TrainStateDirectory(tmp_path)
    _save_fake(d, 1)
    _save_fake(d, 2)
    (tmp_path / "step_00000002" / "sub" / "shard.bin").write_bytes(b"short")
    with pytest.raises(ValueError, match="is 5 bytes, its marker says 14"):
        d.read_marker(tmp_path / "step_00000002")
    assert d.resolve_latest().name == "step_00000001"
    (tmp_path / "step_00000001" / TRAIN_STATE_MARKER).write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="is not 'holderpo/train-state'"):
        d.read_marker(tmp_path / "step_00000001")


# ---------------------------------------------------------------- killed writers
_FAULTS = {
    # the operation whose n-th call kills the writer -> what a resume must find
    "before_marker": ("write_durable", 1, 1),
    "before_rename": ("rename", 1, 1),
    "before_latest": ("replace", 1, 2),  # the interrupted commit is completed
    "during_rotation": ("rmtree", 1, 2),
}


def _killed_writer(root: str, fault: str) -> None:
    op, nth, _ = _FAULTS[fault]
    calls = {"n": 0}

    def tripwire(orig):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] == nth:
                os._exit(17)
            return orig(*a, **k)
        return f

    import pathlib

    if op == "write_durable":
        ts._write_durable = tripwire(ts._write_durable)
    elif op == "rename":
        pathlib.Path.rename = tripwire(pathlib.Path.rename)
    elif op == "replace":
        ts.os.replace = tripwire(os.replace)
    elif op == "rmtree":
        ts.shutil.rmtree = tripwire(shutil.rmtree)
    _save_fake(TrainStateDirectory(root), 2, keep_last=1)
    os._exit(0)


@pytest.mark.parametrize("fault", list(_FAULTS))
def test_a_writer_killed_at_any_point_leaves_a_loadable_state(tmp_path, fault):
    d = TrainStateDirectory(tmp_path)
    _save_fake(d, 1)
    proc = mp.get_context("fork").Process(target=_killed_writer, args=(str(tmp_path), fault))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 17, f"the fault {fault} did not fire"
    d.cleanup_incomplete()
    expected = _FAULTS[fault][2]
    got = d.resolve_latest()
    assert got.name == f"step_{expected:08d}"
    assert d.read_marker(got)["step"] == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".holderpo-root-id"]
    # the run goes on: the next save works and rotates as usual
    _save_fake(d, 3, keep_last=1)
    assert _names(tmp_path) == [".holderpo-root-id", "latest", "step_00000003"]


# ---------------------------------------------------------------- RNG states and arguments
def test_rng_states_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ts.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ts.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_bad_arguments_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="JSON-able"):
        ts.save_train_state(tmp_path, 1, model=None, optimizer=None, extra={"x": object()})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        ts.save_train_state(tmp_path, -1, model=None, optimizer=None)
    with pytest.raises(ValueError, match="keep_last"):
        ts.save_train_state(tmp_path, 1, model=None, optimizer=None, keep_last=0)
    assert list(tmp_path.iterdir()) == []
