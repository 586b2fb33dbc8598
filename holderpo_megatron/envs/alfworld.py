"""ALFWorld text games (TextWorld-PDDL) as a :class:`TextEnv`.

    root = prepare_alfworld_data()                    # unpack the shared tarball once, into a cache
    specs = list_alfworld_games("valid_unseen")       # EpisodeSpec(game="json_2.1.1/...", task_type="heat")
    env = AlfworldEnv(AlfworldEnvConfig(max_steps=50))
    first = env.reset(specs[0])                       # task, first observation, admissible actions

The games come from ``<data>/alfworld/json_2.1.1.tar.gz`` (``<data>`` = ``$HOLDERPO_DATA`` or
``<repo>/../shared/data``); nothing is downloaded. Each game file holds its own PDDL domain,
grammar (with the task text) and walkthrough, so an env needs only textworld and alfworld's
name demangler. textworld is imported when an env is built, not when this module is.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from holderpo_megatron.envs.interface import EnvObservation, EnvStep, EpisodeSpec, TextEnv, normalise_action

__all__ = ["ALFWORLD_SPLITS", "ALFWORLD_TASK_TYPES", "AlfworldEnv", "AlfworldEnvConfig", "default_data_root",
           "list_alfworld_games", "prepare_alfworld_data"]

ALFWORLD_SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
# ALFWorld's task-type names -> the short names results are grouped by.
ALFWORLD_TASK_TYPES = {
    "pick_and_place_simple": "pick",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "look_at_obj_in_light": "look",
    "pick_two_obj_and_place": "pick_two",
}
DEFAULT_CACHE_DIR = Path("~/.cache/holderpo/alfworld")
_GAMES_DIR = "json_2.1.1"  # the tarball's top folder; game paths in games.jsonl start with it
_COMPLETE = ".holderpo-unpacked"  # written last, before the atomic rename: the unpack is whole
_WELCOME = "-= Welcome to TextWorld, ALFRED! =-"
_TASK_PREFIX = "Your task is to: "


def default_data_root() -> Path:
    """The shared data folder: ``$HOLDERPO_DATA``, else ``<repo>/../shared/data`` (may not exist)."""
    env = os.environ.get("HOLDERPO_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _default_tarball(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root if data_root is not None else default_data_root()) / "alfworld" / f"{_GAMES_DIR}.tar.gz"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"ALFWorld {what} not found at {path}: set HOLDERPO_DATA to the shared data "
                                f"folder holding alfworld/ (see its README.md); it is never downloaded")
    return path


def prepare_alfworld_data(tarball: str | os.PathLike | None = None,
                          cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack the games once into ``cache_dir`` and return it (game paths are relative to it).

    Also writes the stub ``traj_data.json`` (``{"task_type": <task folder prefix>}``) that
    alfworld's own game collection needs in each trial folder. Safe when processes race: one
    unpacks under a file lock into a temp folder renamed into place when complete; the others
    wait, then find it done. ``tarball`` defaults to ``<data>/alfworld/json_2.1.1.tar.gz``,
    ``cache_dir`` to ``~/.cache/holderpo/alfworld``.
    """
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    games = cache / _GAMES_DIR
    if (games / _COMPLETE).is_file():
        return cache
    tarball = _require(Path(tarball) if tarball is not None else _default_tarball(None), "games tarball")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".unpack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (games / _COMPLETE).is_file():
            return cache
        if games.exists():
            raise RuntimeError(f"{games} exists but is not a complete unpack (no {_COMPLETE}): delete it and retry")
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
        try:
            with tarfile.open(tarball) as tf:
                tf.extractall(tmp, filter="data")  # the "data" filter refuses absolute paths and links out
            unpacked = tmp / _GAMES_DIR
            if not unpacked.is_dir():
                raise ValueError(f"{tarball} has no top folder {_GAMES_DIR}/; is it the ALFWorld json_2.1.1 tarball?")
            trials = 0
            for game in unpacked.glob("*/*/*/game.tw-pddl"):  # split/task folder/trial folder/game
                task_type = game.parent.parent.name.split("-")[0]
                (game.parent / "traj_data.json").write_text(json.dumps({"task_type": task_type}))
                trials += 1
            (unpacked / _COMPLETE).write_text(json.dumps({"tarball": str(tarball), "trials": trials}))
            os.rename(unpacked, games)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def list_alfworld_games(split: str, root: str | os.PathLike | None = None,
                        limit: int | None = None) -> list[EpisodeSpec]:
    """The solvable games of ``split`` from ``<root>/alfworld/games.jsonl`` (``root``: the shared
    data folder, default :func:`default_data_root`).

    ``game`` is the path relative to :func:`prepare_alfworld_data`'s folder. Deterministic order:
    task types taken in turn (each sorted by path), so the first ``limit`` games cover every type.
    """
    if split not in ALFWORLD_SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}; allowed: {', '.join(ALFWORLD_SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    index = _require(Path(root if root is not None else default_data_root()) / "alfworld" / "games.jsonl",
                     "games index")
    by_type: dict[str, list[str]] = {}
    for n, line in enumerate(index.read_text().splitlines(), start=1):
        row = json.loads(line)
        if row["split"] != split or not row["solvable"]:
            continue
        if row["task_type"] not in ALFWORLD_TASK_TYPES:
            raise ValueError(f"{index}:{n}: unknown task_type {row['task_type']!r}; "
                             f"known: {', '.join(ALFWORLD_TASK_TYPES)}")
        by_type.setdefault(ALFWORLD_TASK_TYPES[row["task_type"]], []).append(row["gamefile"])
    queues = [(t, sorted(by_type[t])) for t in sorted(by_type)]
    specs = [EpisodeSpec(game=games[k], task_type=t, split=split)
             for k in range(max((len(g) for _, g in queues), default=0)) for t, games in queues if k < len(games)]
    return specs[:limit]


@dataclass(frozen=True)
class AlfworldEnvConfig:
    """data_root: the shared data folder (default :func:`default_data_root`); cache_dir: where the
    games are unpacked; max_steps: the episode ends (not won) after this many steps."""

    data_root: str | os.PathLike | None = None
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR
    max_steps: int = 50

    def __post_init__(self):
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"AlfworldEnvConfig.max_steps must be an int >= 1, got {self.max_steps!r}")


def _import_textworld(cache_dir: str | os.PathLike):
    """(textworld, AlfredDemangler), imported on first use so that importing envs/ stays cheap."""
    # alfworld's import creates $ALFWORLD_DATA (default ~/.cache/alfworld) for downloads we never
    # make: point it at our cache instead.
    os.environ.setdefault("ALFWORLD_DATA", str(Path(cache_dir).expanduser()))
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

    return textworld, AlfredDemangler


class AlfworldEnv(TextEnv):
    """One ALFWorld game at a time. ``reward`` is 1.0 on the winning step, else 0.0; ``invalid``:
    the action (whitespace and case normalised) was not among the admissible actions; it is still
    played, and the game answers "Nothing happens."."""

    def __init__(self, cfg: AlfworldEnvConfig = AlfworldEnvConfig()):
        self.cfg = cfg
        _import_textworld(cfg.cache_dir)  # here, so that a pool worker pays it before its first timed reset
        self._games_root: Path | None = None
        self._game = None  # the textworld environment of the current episode
        self._admissible: tuple[str, ...] = ()
        self._steps = 0
        self._done = True

    def game_path(self, spec: EpisodeSpec) -> Path:
        """The game file of ``spec``: ``spec.game`` if absolute, else under the unpacked cache."""
        path = Path(spec.game)
        if not path.is_absolute():
            if self._games_root is None:
                self._games_root = prepare_alfworld_data(_default_tarball(self.cfg.data_root), self.cfg.cache_dir)
            path = self._games_root / path
        if not path.is_file():
            raise FileNotFoundError(f"ALFWorld game file {path} (from EpisodeSpec.game={spec.game!r}) does not exist")
        return path

    def walkthrough(self, spec: EpisodeSpec) -> list[str]:
        """The game file's stored winning action sequence."""
        return list(json.loads(self.game_path(spec).read_text())["walkthrough"])

    def reset(self, spec: EpisodeSpec) -> EnvObservation:
        path = self.game_path(spec)
        textworld, AlfredDemangler = _import_textworld(self.cfg.cache_dir)
        self.close()
        # what alfworld's AlfredTWEnv asks of textworld, minus its gym batching and expert
        infos = textworld.EnvInfos(won=True, admissible_commands=True)
        self._game = textworld.start(str(path), request_infos=infos, wrappers=[AlfredDemangler(shuffle=False)])
        state = self._game.reset()
        text = state.feedback.replace(_WELCOME, "", 1)
        at = text.rfind(_TASK_PREFIX)
        if at < 0:
            raise ValueError(f"no {_TASK_PREFIX!r} line in the first observation of {path}: {text[:300]!r}")
        self._admissible = tuple(state["admissible_commands"])
        self._steps, self._done = 0, False
        return EnvObservation(task=text[at:].strip(), observation=text[:at].strip(),
                              admissible_actions=self._admissible, info={"game": str(path)})

    def step(self, action: str) -> EnvStep:
        if self._game is None or self._done:
            raise RuntimeError("AlfworldEnv.step called with no episode running: reset first (or again after done)")
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}: {action!r}")
        command = normalise_action(action)
        invalid = command not in {normalise_action(a) for a in self._admissible}
        state, _, game_over = self._game.step(command)
        self._steps += 1
        won = bool(state["won"])
        self._done = won or game_over or self._steps >= self.cfg.max_steps
        self._admissible = tuple(state["admissible_commands"])
        return EnvStep(observation=state.feedback.strip(), admissible_actions=self._admissible,
                       reward=1.0 if won else 0.0, done=self._done, won=won, invalid=invalid,
                       info={"steps": self._steps})

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None
        self._done = True
