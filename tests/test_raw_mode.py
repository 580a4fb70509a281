"""The engine's raw mode (what /v1/completions runs): OpenAI's semantics on the one scheduler."""

from __future__ import annotations

import pytest
import torch

from model.errors import BadRequest
from model.serving.sampling import apply_presence_frequency
from model.types import CompletionRequest

TEXT = "The quick brown fox jumps over the lazy dog and"


def raw(engine, **kw):
    return engine.complete(CompletionRequest(**{"text": TEXT, "raw": True, "stop": None, "n": 1,
                                                "max_new_tokens": 12, **kw}))


def test_penalties_are_openai_s_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = apply_presence_frequency(logits, [2, 2, 3], presence=0.5, frequency=0.25)
    # token 2 seen twice: 3 - 2 * 0.25 - 0.5; token 3 once: 4 - 0.25 - 0.5; unseen ones unchanged
    assert out.tolist() == pytest.approx([1.0, 2.0, 2.0, 3.25])
    assert apply_presence_frequency(logits, [], 1.0, 1.0) is logits
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # the caller's logits are left as they were


def test_raw_rows_are_kept_as_they_are_in_order(engine):
    greedy = raw(engine, n=3, greedy=True)
    assert len(greedy.suggestions) == 3 and len({s.text for s in greedy.suggestions}) == 1
    page = engine.complete(CompletionRequest(text=TEXT, n=3, greedy=True, max_new_tokens=12, stop=None))
    assert len({s.text for s in page.suggestions}) == len(page.suggestions)  # the page's rows differ on purpose
    seeded = raw(engine, n=3, seed=5, temperature=1.0, top_p=1.0)
    assert [s.text for s in seeded.suggestions] == [s.text for s in raw(engine, n=3, seed=5, top_p=1.0).suggestions]


def test_the_prompt_is_taken_whole_without_healing(engine):
    done = raw(engine, greedy=True)
    assert done.healed == "" and done.prompt_tokens == len(engine.tokenizer.encode(TEXT))
    with pytest.raises(BadRequest, match="maximum context length is 256 tokens"):
        raw(engine, text="word " * 300)


def test_tokens_join_into_the_text_and_a_stop_keeps_the_tokens_that_start_in_it(engine):
    whole = raw(engine, greedy=True, logprobs=2, max_new_tokens=16).suggestions[0]
    assert "".join(whole.tokens) == whole.text and len(whole.tokens) == len(whole.token_ids) == len(whole.logprobs)
    assert all(len(t) == 2 for t in whole.top_logprobs)
    stop = whole.text[4:7]
    cut = raw(engine, greedy=True, logprobs=2, max_new_tokens=16, stop=[stop]).suggestions[0]
    assert cut.finish_reason == "stop" and cut.text == whole.text[:whole.text.index(stop)]
    starts = [sum(len(t) for t in cut.tokens[:i]) for i in range(len(cut.tokens))]
    assert all(s < len(cut.text) for s in starts) and "".join(cut.tokens).startswith(cut.text)
    assert cut.tokens == whole.tokens[:len(cut.tokens)]


def test_streamed_partials_carry_the_tokens_so_far(engine):
    handle = engine.submit(CompletionRequest(text=TEXT, raw=True, stop=None, n=2, max_new_tokens=10, seed=3,
                                             top_p=1.0, logprobs=1))
    updates = list(engine.stream(handle))
    final = updates[-1].completion
    for update in updates[:-1]:
        for p in update.suggestions:
            s = final.suggestions[p.index]
            assert p.token_ids == s.token_ids[:len(p.token_ids)] and p.tokens == s.tokens[:len(p.tokens)]
            assert s.text.startswith(p.text)


def test_a_prompt_and_max_tokens_that_fill_the_context_get_every_token(engine):
    """248 prompt tokens and 8 new ones fill the tiny model's 256 positions: all 8 come back (the
    last position of the context holds a real token)."""
    from model_support import long_document

    ids = engine.tokenizer.encode(long_document(400))[:248]
    text = engine.tokenizer.decode(ids)
    assert len(engine.tokenizer.encode(text)) + 8 == engine.config.n_positions
    done = engine.complete(CompletionRequest(text, n=1, greedy=True, max_new_tokens=8, raw=True, stop=None))
    assert [len(s.token_ids) for s in done.suggestions] == [8]
