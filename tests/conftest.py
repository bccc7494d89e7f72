"""Test configuration: every test starts from the same seed."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(1234)
