"""The base-weight dtype is chosen by measurement: bf16 only where it is faster."""

import warnings

import pytest
import torch

from peftkit import precision


@pytest.mark.parametrize("faster", [True, False])
def test_base_dtype(monkeypatch, faster: bool) -> None:
    monkeypatch.setattr(precision, "bf16_is_faster", lambda device: faster)
    assert precision.base_dtype(None, False, "cpu") == (torch.bfloat16 if faster else torch.float32)
    assert precision.base_dtype(False, False, "cpu") == torch.float32
    assert precision.base_dtype(None, True, "cpu") == torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = precision.base_dtype(True, False, "cpu")
    assert chosen == (torch.bfloat16 if faster else torch.float32)
    assert bool(caught) == (not faster)

