"""ALFWorld through the env layer: real games from the shared data, real textworld, real workers.

The walkthrough replay (20 games of each validation split, every task type, through an EnvPool of
2 workers) must win every game; the data preparation is checked on a small tarball made here.
Tests that need the shared games skip with a message when they are absent.
"""

import json
import os
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import pytest

from holderpo_megatron.envs import (ALFWORLD_SPLITS, ALFWORLD_TASK_TYPES, AlfworldEnv, AlfworldEnvConfig,
                                    EnvObservation, EnvPool, EpisodeSpec, default_data_root, list_alfworld_games,
                                    prepare_alfworld_data)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DATA = default_data_root() / "alfworld"
needs_data = pytest.mark.skipif(
    not (DATA / "games.jsonl").is_file() or not (DATA / "json_2.1.1.tar.gz").is_file(),
    reason=f"ALFWorld games not found under {DATA} (set HOLDERPO_DATA to the shared data folder)")
GAMES_PER_SPLIT = 20


@pytest.fixture(scope="module")
def alfworld_installed():
    for name in ("textworld", "alfworld"):
        pytest.importorskip(name, reason=f"{name} is not installed (pip install --no-deps -r requirements-alfworld.txt)")


@pytest.fixture(scope="module")
def alfworld(alfworld_installed):
    prepare_alfworld_data()


def shortest_games(split: str, env: AlfworldEnv, n: int) -> list[tuple[EpisodeSpec, list[str]]]:
    """``n`` games of ``split``, task types in turn, each type's shortest walkthroughs first."""
    by_type: dict[str, list] = {}
    for spec in list_alfworld_games(split):
        by_type.setdefault(spec.task_type, []).append((spec, env.walkthrough(spec)))
    queues = [sorted(games, key=lambda g: (len(g[1]), g[0].game)) for _, games in sorted(by_type.items())]
    picked = [q[k] for k in range(max(map(len, queues))) for q in queues if k < len(q)]
    return picked[:n]


@needs_data
def test_walkthroughs_win_every_game_through_a_pool_of_two_workers(alfworld):
    env = AlfworldEnv()
    games = shortest_games("valid_seen", env, GAMES_PER_SPLIT) + shortest_games("valid_unseen", env, GAMES_PER_SPLIT)
    for split in ("valid_seen", "valid_unseen"):
        assert {s.task_type for s, _ in games if s.split == split} == set(ALFWORLD_TASK_TYPES.values())
    specs = [s for s, _ in games]
    walks = [w for _, w in games]
    with EnvPool(partial(AlfworldEnv, AlfworldEnvConfig()), num_workers=2) as pool:
        firsts = pool.reset(specs)
        for spec, first in zip(specs, firsts):
            assert isinstance(first, EnvObservation), (spec.game, first)
            assert first.task.startswith("Your task is to: ") and "Your task" not in first.observation
            assert first.observation.startswith("You are in the middle of a room")
            assert "Welcome" not in first.observation
            assert first.admissible_actions
        active = set(range(len(specs)))
        t = 0
        while active:
            results = pool.step({i: walks[i][t] for i in sorted(active)})
            for i, r in results.items():
                assert not r.failed and not r.invalid, (specs[i].game, walks[i][t], r)
                last = t == len(walks[i]) - 1
                expected = (True, True, 1.0) if last else (False, False, 0.0)
                assert (r.won, r.done, r.reward) == expected, (specs[i].game, t, r)
                if last:
                    active.discard(i)
            t += 1
        assert pool.stats == {"episodes": len(specs), "steps": sum(map(len, walks)), "failed_crash": 0,
                              "failed_timeout": 0, "failed_error": 0, "worker_restarts": 0}


@needs_data
def test_invalid_and_normalised_actions_and_the_step_limit(alfworld):
    env = AlfworldEnv(AlfworldEnvConfig(max_steps=3))
    spec = list_alfworld_games("valid_unseen", limit=1)[0]
    first = env.reset(spec)
    r = env.step("fly to the moon")
    assert r.invalid and r.observation == "Nothing happens." and not r.done and not r.failed
    assert r.admissible_actions == first.admissible_actions  # nothing changed
    go = next(a for a in first.admissible_actions if a.startswith("go to "))
    r = env.step("  " + go.upper().replace(" ", "   ") + " ")  # case and spacing do not matter
    assert not r.invalid and r.observation.startswith("You arrive at") and not r.done
    r = env.step("look")
    assert r.done and not r.won and r.reward == 0.0  # max_steps=3 reached
    with pytest.raises(RuntimeError, match="reset first"):
        env.step("look")
    env.close()


@needs_data
def test_the_split_index_and_alfworlds_own_game_collection(alfworld):
    counts = {s: len(list_alfworld_games(s)) for s in ALFWORLD_SPLITS}
    assert counts == {"train": 3553, "valid_seen": 140, "valid_unseen": 134, "valid_train": 200}
    first12 = list_alfworld_games("valid_seen", limit=12)
    assert {s.task_type for s in first12} == set(ALFWORLD_TASK_TYPES.values())
    assert list_alfworld_games("valid_seen", limit=12) == first12  # deterministic
    # alfworld's AlfredTWEnv finds every game through the stub traj_data.json files
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    cfg = {"env": {"goal_desc_human_anns_prob": 0, "task_types": [1, 2, 3, 4, 5, 6]},
           "dataset": {"eval_ood_data_path": str(prepare_alfworld_data() / "json_2.1.1" / "valid_unseen"),
                       "num_eval_games": -1}}
    assert AlfredTWEnv(cfg, train_eval="eval_out_of_distribution").num_games == 134


# ----------------------------------------------------------------------------- no shared data needed

def make_tarball(path: Path, top: str = "json_2.1.1") -> Path:
    src = path.parent / "src"
    trial = src / top / "valid_seen" / "pick_heat_then_place_in_recep-Apple-None-Fridge-1" / "trial_T1"
    trial.mkdir(parents=True)
    (trial / "game.tw-pddl").write_text(json.dumps({"walkthrough": ["go to fridge 1"], "solvable": True}))
    with tarfile.open(path, "w:gz") as tf:
        tf.add(src / top, arcname=top)
    return path


def test_prepare_unpacks_once_even_when_processes_race(alfworld_installed, tmp_path):
    tarball = make_tarball(tmp_path / "games.tar.gz")
    cache = tmp_path / "cache"
    code = ("import sys; from holderpo_megatron.envs.alfworld import prepare_alfworld_data; "
            "print(prepare_alfworld_data(sys.argv[1], sys.argv[2]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    racers = [subprocess.Popen([sys.executable, "-c", code, str(tarball), str(cache)], stdout=subprocess.PIPE,
                               text=True, env=env) for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in racers] == [str(cache)] * 3
    assert all(p.returncode == 0 for p in racers)
    trial = cache / "json_2.1.1/valid_seen/pick_heat_then_place_in_recep-Apple-None-Fridge-1/trial_T1"
    assert json.loads((trial / "traj_data.json").read_text()) == {"task_type": "pick_heat_then_place_in_recep"}
    assert sorted(p.name for p in cache.iterdir()) == [".unpack.lock", "json_2.1.1"]  # no temp folder left
    spec = EpisodeSpec(game=str(trial.relative_to(cache) / "game.tw-pddl"))
    env_ = AlfworldEnv(AlfworldEnvConfig(data_root=tmp_path / "nowhere", cache_dir=cache))
    assert env_.walkthrough(spec) == ["go to fridge 1"]  # unpacked already: the missing data root is not needed


def test_bad_data_and_bad_arguments_are_refused_clearly(alfworld_installed, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="HOLDERPO_DATA"):
        prepare_alfworld_data(tmp_path / "missing.tar.gz", tmp_path / "cache")
    with pytest.raises(ValueError, match="no top folder json_2.1.1"):
        prepare_alfworld_data(make_tarball(tmp_path / "other.tar.gz", top="games"), tmp_path / "cache2")
    allowed = "allowed: train, valid_seen, valid_unseen, valid_train"
    with pytest.raises(ValueError, match=f"unknown ALFWorld split 'test'; {allowed}"):
        list_alfworld_games("test")
    with pytest.raises(ValueError, match="limit must be"):
        list_alfworld_games("train", limit=0)
    monkeypatch.setenv("HOLDERPO_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="games index not found at .*empty/alfworld/games.jsonl"):
        list_alfworld_games("train")
    (tmp_path / "idx/alfworld").mkdir(parents=True)
    (tmp_path / "idx/alfworld/games.jsonl").write_text(
        json.dumps({"split": "train", "task_type": "juggle", "gamefile": "g", "solvable": True}) + "\n")
    with pytest.raises(ValueError, match="unknown task_type 'juggle'"):
        list_alfworld_games("train", root=tmp_path / "idx")
    with pytest.raises(ValueError, match="max_steps must be an int >= 1, got 0"):
        AlfworldEnvConfig(max_steps=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AlfworldEnv().game_path(EpisodeSpec(game=str(tmp_path / "no/game.tw-pddl")))
