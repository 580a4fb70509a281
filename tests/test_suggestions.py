"""What a completion gives: ranked greedy rows, the plain generation path's rows, distinct non-empty
suggestions, stop rules, whole characters only, and statistics that add up.
"""

from __future__ import annotations

import pytest

from model.serving.autocomplete import apply_stop
from model.types import CompletionRequest
from model_support import STORY, assert_good_suggestions, ids, prompt_of, suggest


def test_greedy_suggestions_start_from_the_most_likely_first_tokens(engine):
    text = "Hello there! How are you"
    three = suggest(engine, text, n=3, greedy=True, max_new_tokens=6)
    one = suggest(engine, text, n=1, greedy=True, max_new_tokens=6)
    assert_good_suggestions(three, 3)
    assert len(three) == 3
    assert three[0].token_ids == one[0].token_ids
    firsts = [s.token_ids[0] for s in three]
    assert len(set(firsts)) == 3
    # Ranked: the first token of suggestion i is at least as likely as that of suggestion i + 1.
    assert three[0].logprobs[0] >= three[1].logprobs[0] >= three[2].logprobs[0]


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3),
                                      dict(temperature=1.3, top_p=1.0), dict(greedy=True, repetition_penalty=1.5)])
def test_engine_matches_the_plain_generation_path(engine, settings):
    """From an empty document (no healing) the engine's rows are `generate`'s continuations."""
    from model.serving.generation import generate

    seed = 99
    got = suggest(engine, "", n=3, seed=seed, max_new_tokens=10, stop=None, **settings)
    rows = generate(engine.model, [engine.eos], 10, n=6, seed=seed, eos_token_id=engine.eos,
                    **{"top_p": 0.9, **settings})
    want, seen = [], set()  # the engine keeps the first distinct, non-empty rows, in seed order
    for row in rows:
        row = row[:-1] if row and row[-1] == engine.eos else row
        key = engine.tokenizer.decode(row).strip()
        if key and key not in seen and len(want) < 3:
            seen.add(key)
            want.append(row)
    assert ids(got) == want


@pytest.mark.parametrize("text", ["", "The market opened", "Hello there! How are you today? I hope"])
def test_suggestions_are_distinct_and_non_empty(engine, text):
    for seed in range(3):
        assert_good_suggestions(suggest(engine, text, n=5, seed=seed, max_new_tokens=6), 5)
        assert_good_suggestions(suggest(engine, text, n=5, seed=seed, max_new_tokens=6, stop=None), 5)
    assert_good_suggestions(suggest(engine, text, n=5, greedy=True, max_new_tokens=6), 5)


def test_stop_auto_none_and_list(engine):
    tok = engine.tokenizer
    for text in ["The market opened early on Monday", "Hello there! How are you today? I", STORY]:
        free = suggest(engine, text, n=1, greedy=True, max_new_tokens=40, stop=None)[0]
        assert free.finish_reason in ("length", "eos")
        if free.finish_reason == "length":
            assert len(free.token_ids) == 40
        auto = suggest(engine, text, n=1, greedy=True, max_new_tokens=40, stop="auto")[0]
        assert auto.token_ids == free.token_ids[:len(auto.token_ids)]
        cut, stopped = apply_stop(free.text, "auto")
        assert auto.text == cut
        assert auto.finish_reason == ("stop" if stopped else free.finish_reason)
        if stopped:
            assert len(auto.token_ids) < 40
        # A list of stop strings: cut at the first one, decoding no further than needed.
        for stops in (["e"], [" ", "\n"], [",", "."]):
            listed = suggest(engine, text, n=1, greedy=True, max_new_tokens=40, stop=stops)
            cut, stopped = apply_stop(free.text, stops)
            if not cut.strip():  # the greedy text starts at a stop: that candidate is dropped, never shown empty
                assert all(s.token_ids[0] != free.token_ids[0] for s in listed)
                continue
            s = listed[0]  # the greedy candidate itself, cut at the first stop string
            assert s.text == cut and not any(x in s.text for x in stops)
            assert s.token_ids == free.token_ids[:len(s.token_ids)]
            assert s.finish_reason == ("stop" if stopped else free.finish_reason)
            if stopped:
                assert any(free.text[len(s.text):].startswith(x) for x in stops)
                assert any(x in tok.decode(s.token_ids) for x in stops)  # decoded no further than needed


def test_stop_list_cuts_sampled_suggestions(engine):
    for seed in range(4):
        free = suggest(engine, STORY, n=3, seed=seed, max_new_tokens=20, stop=None)
        listed = suggest(engine, STORY, n=3, seed=seed, max_new_tokens=20, stop=["e", "a"])
        for s in listed:
            assert "e" not in s.text and "a" not in s.text and s.text.strip()
        for s, f in zip(listed, free):
            if s.token_ids == f.token_ids[:len(s.token_ids)] and s.finish_reason == "stop":
                assert f.text.startswith(s.text) and f.text[len(s.text)] in "ea"


def test_a_character_spelled_over_several_tokens_shows_only_when_complete(engine):
    """"€" is three bytes; generated one byte token at a time, the suggestion never ends in half of it."""
    from model.serving.autocomplete import Prompt, continuation

    tok = engine.tokenizer
    table = tok.all_token_bytes()
    byte_token = {b: i for i, b in enumerate(table) if len(b) == 1}
    euro = "€".encode("utf-8")
    generated = [byte_token[b"A"]] + [byte_token[bytes([b])] for b in euro]
    prompt = Prompt(tokens=[1], heal=b"")
    shown = [continuation(tok, prompt, generated[:i]) for i in range(1, len(generated) + 1)]
    assert shown == ["A", "A", "A", "A€"]


def test_stats_add_up(make_engine):
    engine = make_engine()
    texts = [STORY, STORY + " roads", "Hello there! How are you", "", "Hel"]
    total = {"tokens_prefilled": 0, "tokens_reused": 0, "tokens_decoded": 0}
    for i, text in enumerate(texts):
        done = engine.complete(CompletionRequest(text, n=2, seed=i, max_new_tokens=6))
        t = done.timings
        assert t.tokens_prefilled + t.tokens_reused == len(prompt_of(engine, text, 6).tokens)
        # Every suggestion's tokens but the first came from a decode step (an eos also took one).
        assert t.tokens_decoded >= sum(len(s.token_ids) - 1 for s in done.suggestions)
        assert t.total_ms >= t.prefill_ms >= 0 and t.total_ms >= t.decode_ms >= 0 and t.queue_ms >= 0
        for k in total:
            total[k] += getattr(t, k)
    stats = engine.stats()
    for k, v in total.items():
        assert stats[k] == v, k
    assert stats["requests"] == len(texts)
    assert stats["tokens_reused"] > 0
    assert stats["rows"] == 8 and stats["kv_tokens"] == 8 * engine.config.n_positions and stats["memory_bytes"] > stats["cache_bytes"] > 0
