"""Shared fixtures: tiny checkpoints in the Hub's layout, made once per session, and engines on them.

Engines run the production admission policy (EngineConfig's defaults) unless a test builds one
with a config that says otherwise."""

from __future__ import annotations

import pytest

from model.network.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 checkpoint (LM only, Hub keys without the `transformer.` prefix)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_heads(tmp_path_factory):
    """A tiny GPT-2 checkpoint with sequence-classification and question-answering heads."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2-heads"), "gpt2", seed=1,
                           heads=["sequence-classification", "question-answering"])


@pytest.fixture(scope="session")
def tiny_openai(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-openai"), "openai-gpt", seed=2)


@pytest.fixture(scope="module")
def engine(tiny_gpt2):
    """One engine on the tiny checkpoint for a module's tests that only ask it things (8 slots)."""
    from model import Engine
    from model_support import DEVICE

    e = Engine.from_pretrained(str(tiny_gpt2), slots=8, device=DEVICE)
    yield e
    e.close()


@pytest.fixture(scope="module")
def heads_engine(tiny_gpt2_heads):
    """One engine on the tiny checkpoint with classification and QA heads (4 slots)."""
    from model import Engine
    from model_support import DEVICE

    e = Engine.from_pretrained(str(tiny_gpt2_heads), slots=4, device=DEVICE)
    yield e
    e.close()


@pytest.fixture
def make_engine(tiny_gpt2):
    """Engines on the tiny checkpoint (or `path`), closed after the test; `delay` slows every forward
    pass so a request is reliably still running when the test looks at it. `config` (EngineConfig)
    sets the engine up: by default the production admission policy, as a server runs it; `slots`
    overrides its slots. WWT_TEST_DEVICE picks the device (token-for-token comparisons hold in
    float32 on the CPU)."""
    from model import Engine
    from model_support import DEVICE, slow_down

    made = []

    def make(path=None, slots: int = 8, delay: float = 0.0, config=None):
        engine = Engine.from_pretrained(str(path or tiny_gpt2), slots=slots, device=DEVICE, config=config)
        if delay:
            slow_down(engine, delay)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture(scope="module")
def server(tiny_gpt2, tiny_gpt2_heads, tmp_path_factory):
    """`wwt serve` (embedded) offering the tiny LM as `tiny` and the tiny model with heads as
    `heads`, on a free loopback port; one per test module. A module that needs another server
    defines its own `server`."""
    from ui_support import Server

    server = Server([f"tiny={tiny_gpt2}", f"heads={tiny_gpt2_heads}"], tmp_path_factory.mktemp("serve")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    """A gradio_client.Client of `server` (the distributed modules define their own `client`)."""
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A password-protected redis-server on a free loopback port, one per test module."""
    from app.bench.processes import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
