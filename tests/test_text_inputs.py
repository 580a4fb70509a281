"""What is typed: token healing of the last token, odd and unusual texts, a typed end-of-text marker,
and settings out of range (refused, changing nothing).
"""

from __future__ import annotations

import pytest

from model.contract import clean_output, clean_text
from model.errors import BadRequest
from model.types import CompletionRequest
from model_support import assert_good_suggestions, idle, prompt_of, suggest, whole_characters


HEAL_TEXTS = ["Hel", "Hello wor", "The weather in the val", "Once upon a ti", "caf", "Z\u00fcr", "e-mail@exa"]


@pytest.mark.parametrize("greedy", [True, False])
def test_token_healing_spells_out_what_was_typed(engine, greedy):
    tok = engine.tokenizer
    for text in HEAL_TEXTS:
        heal = tok.token_bytes(tok.encode(text)[-1])
        prompt = prompt_of(engine, text, 6)
        assert prompt.heal == heal
        done = engine.complete(CompletionRequest(text, n=3, greedy=greedy, seed=7, max_new_tokens=6))
        assert done.healed == heal.decode("utf-8", errors="replace")
        assert_good_suggestions(done.suggestions, 3)
        for s in done.suggestions:
            generated = tok.decode_bytes(s.token_ids)
            assert generated.startswith(heal), (text, generated)
            pending = heal  # each token either finishes the typed bytes or is a piece of them
            for t in s.token_ids:
                if not pending:
                    break
                b = tok.token_bytes(t)
                assert b.startswith(pending) or pending.startswith(b), (text, b, pending)
                pending = b"" if b.startswith(pending) else pending[len(b):]
            full = clean_output(whole_characters(tok, prompt.tokens + s.token_ids))  # nor control characters
            assert full.startswith(text + s.text), (text, s.text, full)


def test_prompt_start_token_when_nothing_is_left(engine):
    """A one-token text is all healed: the prompt is end-of-text and the suggestion starts with the text."""
    done = engine.complete(CompletionRequest("H", n=2, greedy=True, max_new_tokens=4))
    assert done.healed == "H"
    for s in done.suggestions:
        assert engine.tokenizer.decode_bytes(s.token_ids).startswith(b"H")


ODD_TEXTS = ["", " ", "   \t ", "\n\n", "😀", "A smile 😀", "e\u0301", "cafe\u0301 au lait", "שלום עולם",
             "مرحبا بالعالم", "\x00", "a\x00b", "\ud800", "abc\ud800", "\ud83d\ude00", "\ufeff", "🏳️‍🌈",
             "日本語", "\u200f\u200e"]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_texts_give_suggestions(engine, text):
    """Every odd text is cleaned and answered (a model with a start token needs no text at all)."""
    for greedy in (True, False):
        done = engine.complete(CompletionRequest(text, n=3, greedy=greedy, seed=3, max_new_tokens=5))
        assert_good_suggestions(done.suggestions, 3)
        cleaned = clean_text(text)
        prompt = prompt_of(engine, cleaned, 5)
        for s in done.suggestions:
            full = whole_characters(engine.tokenizer, prompt.tokens + s.token_ids)
            if prompt.tokens == [engine.eos]:
                full = whole_characters(engine.tokenizer, s.token_ids)
            assert clean_output(full).startswith(cleaned + s.text)  # no control characters in a suggestion
    assert idle(engine)


def test_typed_end_of_text_marker_is_plain_text(engine):
    """A person typing "<|endoftext|>" means those characters, not the model's end-of-text token."""
    ids = engine.tokenizer.encode("Hello<|endoftext|>")
    assert engine.eos not in ids
    assert engine.tokenizer.decode(ids) == "Hello<|endoftext|>"
    assert_good_suggestions(suggest(engine, "Hello<|endoftext|>", n=2, max_new_tokens=5, seed=0))


BAD_SETTINGS = [dict(n=0), dict(n=100), dict(n=-1), dict(n=2.5), dict(n=True), dict(temperature=-1),
                dict(temperature=6), dict(temperature=float("nan")), dict(n="3"), dict(top_k=True), dict(top_p=2), dict(top_p=0),
                dict(top_p=float("nan")), dict(top_k=-1), dict(max_new_tokens=0), dict(max_new_tokens=10000),
                dict(stop=123), dict(stop="sometimes"), dict(stop=["ok", 5]), dict(seed=-1), dict(seed="x"),
                dict(repetition_penalty=0), dict(max_time=-1), dict(text="a" * 2_000_000), dict(text=b"bytes"),
                dict(text=42)]


def test_out_of_range_settings_raise_bad_request_and_change_nothing(engine):
    suggest(engine, "Hello", n=1, max_new_tokens=2, seed=0)
    before = engine.stats()
    pool_before = [engine.scheduler.pool.held(i) for i in range(engine.scheduler.pool.size)]
    for bad in BAD_SETTINGS:
        fields = dict(text="Hello there", n=2, max_new_tokens=4)
        fields.update(bad)
        with pytest.raises(BadRequest) as e:
            engine.complete(CompletionRequest(**fields))
        assert e.value.message
        with pytest.raises(BadRequest):
            engine.submit(CompletionRequest(**fields))
        text = fields.pop("text")
        with pytest.raises(BadRequest):
            suggest(engine, text, **fields)
    assert engine.stats() == before
    assert [engine.scheduler.pool.held(i) for i in range(engine.scheduler.pool.size)] == pool_before
    assert not engine.scheduler.pool.busy()


def test_zero_max_time_is_rejected(engine):
    with pytest.raises(BadRequest, match="max_time"):
        suggest(engine, "Hello", max_time=0)
