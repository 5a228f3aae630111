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


@pytest.fixture(scope="module", autouse=True)
def _release_memory():
    """After each module: collect its models and graphs and hand freed heap back to the OS (keeps `make test`'s
    peak resident memory near the largest single module's, not the sum of what glibc kept)."""
    yield
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


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


@pytest.fixture(scope="session")
def tiny_gqa_llama_dir(tmp_path_factory):
    """A random 2-layer Llama with grouped-query attention (like Llama-3.1-8B) and non-trivial norm gains, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from crv.reasoner.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.2 * torch.randn_like(p)
    out = tmp_path_factory.mktemp("tiny_gqa_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pytest_runtest_teardown(item):
    """With CRV_TEST_RSS=1, print each test's resident memory after it ran (to find the heavy ones)."""
    import os

    if os.environ.get("CRV_TEST_RSS"):
        import resource

        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"\nRSS {rss / 1e6:.2f} GB peak {peak / 1e6:.2f} GB {item.nodeid}")
