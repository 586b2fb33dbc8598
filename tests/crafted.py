"""Hostile inputs shared by the tests of what we refuse to load."""

from __future__ import annotations

import os
import pickle
from pathlib import Path


class _Exploit:
    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def exploit_pickle(flag: Path) -> bytes:
    """A pickle whose loading runs ``touch flag`` through os.system (what a plain pickle.load does)."""
    return pickle.dumps(_Exploit(flag))
