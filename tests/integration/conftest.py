"""Fixtures shared by the SGLang integration tests."""

from __future__ import annotations

import pytest

from tests.integration.tiny_llama import require_sglang, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama HF directory, built once per test module (skips where SGLang is absent)."""
    require_sglang()
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
