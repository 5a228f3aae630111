"""Shared fixtures: a tiny reasoner trained once per test session (seconds on CPU)."""

import pytest
import torch

from crv.reasoner.model import ModelConfig
from crv.reasoner.train import TrainConfig, train_reasoner

TINY = TrainConfig(
    model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, max_len=256),
    iterations=25, tokens_per_batch=2048, lr=3e-3, warmup=5, n_max=3, seed=0,
)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_reasoner_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_reasoner")
    train_reasoner(TINY, out, progress=False)
    return out / "final"
