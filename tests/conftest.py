"""Shared fixtures: the tiny model is built once per test session into a temporary checkpoint directory."""

import pytest
import torch

from model import load_policy
from demo.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "tiny-init"))


@pytest.fixture(scope="session")
def policy(tiny_path):
    """(model, tokenizer, image_processor) of the tiny model on CPU in fp32. Tests must not update it."""
    return load_policy(tiny_path, torch.device("cpu"), torch.float32)
