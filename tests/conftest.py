"""Shared fixtures (the plain models and constants they use live in `helpers`, which tests import directly)."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory):
    """A PEFTKIT_HOME shared by every slow test, so smollm2-135m is converted once (~20 s) and the user's cache is
    untouched."""
    from peftkit.models import resolve_model_path

    home = tmp_path_factory.mktemp("peftkit_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKIT_HOME", str(home))
        resolve_model_path("smollm2-135m")
    return home


@pytest.fixture
def smollm2(smollm2_home, monkeypatch: pytest.MonkeyPatch) -> str:
    """The alias `smollm2-135m`, resolving to the shared converted copy while the test runs."""
    monkeypatch.setenv("PEFTKIT_HOME", str(smollm2_home))
    return "smollm2-135m"
