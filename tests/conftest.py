"""Shared fixtures: tiny checkpoints in the Hub's layout, made once per session."""

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
