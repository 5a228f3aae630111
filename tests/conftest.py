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


@pytest.fixture(scope="session")
def verifier():
    """The shipped verifier (reasoner, transcoders, classifier), loaded once."""
    from crv.api.verifier import Verifier

    return Verifier.load()


@pytest.fixture(scope="module")
def verifier_app(verifier):
    from fastapi.testclient import TestClient

    from crv.api.app import create_app

    return TestClient(create_app(verifier))


@pytest.fixture(scope="module")
def live_server(verifier):
    """A real uvicorn server on 127.0.0.1 (a free port), in a thread; stopped after the module."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    import httpx
    import uvicorn

    from crv.api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(verifier), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield SimpleNamespace(url=url, verifier=verifier)
    server.should_exit = True
    thread.join(10)
