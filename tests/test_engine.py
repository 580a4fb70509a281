"""The engine: prefix reuse, forking, batching, eviction, cancellation, healing, odd inputs, threads.

Correctness only: every result is compared with the same request computed another way
(from scratch, alone, unbatched, on a fresh engine). Nothing here measures speed; where a
test needs a request to be long-running, the model is slowed down instead of racing it.
"""

from __future__ import annotations

import os
import threading
import time

from typing import Optional

import pytest
import torch

from model import Engine
from model.contract import clean_output, clean_text
from model.serving.autocomplete import apply_stop, build_prompt
from model.errors import BadRequest, Busy, Cancelled, RequestTimeout
from model.serving.slots import common_prefix
from model.network.tiny import corpus_lines
from model.types import CompletionRequest
from model_support import idle, wait_until

# Token-for-token comparisons hold in float32 on the CPU; set this to try another device.
DEVICE = os.environ.get("WWT_TEST_DEVICE", "cpu")
STORY = "The weather in the valley turned cold that night. Snow covered the"


# -- utilities ----------------------------------------------------------------------------------


def prompt_of(engine: Engine, text: str, max_new_tokens: int = 8):
    return build_prompt(engine.tokenizer, clean_text(text), engine.config.n_positions - max_new_tokens, engine.eos)


def whole_characters(tok, token_ids) -> str:
    """What a suggestion shows of these tokens (complete text: nothing is cut at its end)."""
    return clean_output(tok.decode_bytes(token_ids).decode("utf-8", errors="replace"))


def ids(suggestions) -> list[list[int]]:
    return [s.token_ids for s in suggestions]




def assert_good_suggestions(suggestions, n: int = None):
    assert suggestions, "no suggestion at all"
    if n is not None:
        assert len(suggestions) <= n
    keys = [s.text.strip() for s in suggestions]
    assert all(keys), f"an empty suggestion: {[s.text for s in suggestions]}"
    assert len(set(keys)) == len(keys), f"duplicate suggestions: {keys}"
    for s in suggestions:
        assert s.token_ids and len(s.logprobs) == len(s.token_ids)
        assert all(lp <= 1e-6 for lp in s.logprobs)


def long_document(words: int) -> str:
    text = " ".join(corpus_lines())
    while len(text.split()) < words:
        text = text + " " + text
    return " ".join(text.split()[:words])


@pytest.fixture(scope="module")
def engine(tiny_gpt2):
    e = Engine.from_pretrained(str(tiny_gpt2), slots=8, device=DEVICE)
    yield e
    e.close()


@pytest.fixture(scope="module")
def heads_engine(tiny_gpt2_heads):
    e = Engine.from_pretrained(str(tiny_gpt2_heads), slots=4, device=DEVICE)
    yield e
    e.close()


# -- prefix reuse -------------------------------------------------------------------------------
def test_reused_prefix_equals_from_scratch(make_engine):
    warm = make_engine()
    first = warm.completion(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=8))
    assert first.timings.tokens_reused == 0
    assert first.timings.tokens_prefilled == len(prompt_of(warm, STORY).tokens)
    base = prompt_of(warm, STORY).tokens
    for text in [STORY + " roads, the river froze",  # typed on
                 STORY + " roads, the river froze along",  # and on
                 STORY.replace("cold", "warm") + " roads",  # an edit in the middle
                 STORY[:-12]]:  # backspace
        got = warm.completion(CompletionRequest(text, n=3, greedy=True, max_new_tokens=8))
        prompt = prompt_of(warm, text).tokens
        t = got.timings
        assert t.tokens_prefilled + t.tokens_reused == len(prompt)
        assert t.tokens_reused >= min(common_prefix(base, prompt), len(prompt) - 1)
        assert t.tokens_reused > 0
        scratch = make_engine().completion(CompletionRequest(text, n=3, greedy=True, max_new_tokens=8))
        assert scratch.timings.tokens_reused == 0
        assert ids(got.suggestions) == ids(scratch.suggestions)
        assert [s.text for s in got.suggestions] == [s.text for s in scratch.suggestions]
        for a, b in zip(got.suggestions, scratch.suggestions):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        base = prompt
    assert warm.stats()["tokens_reused"] > 0


def test_forked_suggestions_equal_independent_runs(make_engine):
    text = "Once upon a time there was a small robot that"
    seed = 1234
    engine = make_engine()
    forked = engine.complete(text, n=3, seed=seed, max_new_tokens=10, stop=None)
    assert len(forked) == 3
    again = engine.complete(text, n=3, seed=seed, max_new_tokens=10, stop=None)  # through the prefix cache
    assert ids(again) == ids(forked)
    for i in range(3):
        alone = make_engine().complete(text, n=1, seed=seed + i, max_new_tokens=10, stop=None)
        assert alone[0].token_ids == forked[i].token_ids
        assert alone[0].text == forked[i].text


def test_suggestions_reading_their_shared_prompt_once_equal_independent_runs(make_engine, monkeypatch):
    """The tiny model's prompts are short, so the threshold for sharing is lowered to reach them."""
    from model.serving import kv_cache

    text = "Once upon a time there was a small robot that"
    seed = 99
    monkeypatch.setattr(kv_cache, "SHARED_PREFIX_MIN", 4)
    groups = []
    inner = kv_cache.CacheView._attend_shared
    monkeypatch.setattr(kv_cache.CacheView, "_attend_shared",
                        lambda self, *a, **kw: groups.append(len(a[3])) or inner(self, *a, **kw))
    shared = make_engine().complete(text, n=3, seed=seed, max_new_tokens=10, stop=None)
    assert groups and max(groups) == 3
    for i in range(3):
        alone = make_engine().complete(text, n=1, seed=seed + i, max_new_tokens=10, stop=None)
        assert alone[0].token_ids == shared[i].token_ids


def test_greedy_suggestions_start_from_the_most_likely_first_tokens(engine):
    text = "Hello there! How are you"
    three = engine.complete(text, n=3, greedy=True, max_new_tokens=6)
    one = engine.complete(text, n=1, greedy=True, max_new_tokens=6)
    assert_good_suggestions(three, 3)
    assert len(three) == 3
    assert three[0].token_ids == one[0].token_ids
    firsts = [s.token_ids[0] for s in three]
    assert len(set(firsts)) == 3
    # Ranked: the first token of suggestion i is at least as likely as that of suggestion i + 1.
    assert three[0].logprobs[0] >= three[1].logprobs[0] >= three[2].logprobs[0]


# -- batching -----------------------------------------------------------------------------------
BATCH_TEXTS = ["Hello there! How are", "The market opened early on Monday. Traders",
               "Scientists measured the speed of sound in water, in air and in steel. The",
               "Once upon a time", "Questions and answers: Where is the library? The library is",
               "Numbers and symbols appear in text too: 1, 2, 3,"]


def test_batched_decode_equals_unbatched(make_engine):
    batched = make_engine(slots=12, delay=0.003)
    handles = [batched.submit(CompletionRequest(t, n=2, greedy=True, max_new_tokens=12, stop=None))
               for t in BATCH_TEXTS]
    together = [h.result(timeout=60)[0] for h in handles]
    assert batched.stats()["max_batch"] > 2, "the requests never shared a decode step"
    alone = make_engine(slots=12)
    for text, got in zip(BATCH_TEXTS, together):
        solo = alone.complete(text, n=2, greedy=True, max_new_tokens=12, stop=None)
        assert ids(got) == ids(solo), text
    assert idle(batched)


def test_prompts_of_equal_length_prefill_together_and_equal_alone(make_engine):
    engine = make_engine(slots=12)
    by_length: dict = {}
    words = STORY.split()
    for i in range(len(words)):  # three different prompts of one length in tokens
        line = " ".join(words[i:] + words[:i])
        by_length.setdefault(len(prompt_of(engine, line, 6).tokens), []).append(line)
    texts = max(by_length.values(), key=len)[:3]
    lengths = {len(prompt_of(engine, t, 6).tokens) for t in texts}
    assert len(texts) == 3 and len(set(texts)) == 3 and len(lengths) == 1
    shapes = []
    inner = engine.model.transformer.forward

    def forward(ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return inner(ids, *args, **kwargs)

    engine.model.transformer.forward = forward
    started = threading.Event()
    hold = threading.Thread(target=engine.run, args=(lambda: started.set() or time.sleep(0.5),))
    hold.start()  # keeps the model thread busy, so the three requests arrive in one turn
    assert started.wait(30)
    handles = [engine.submit(CompletionRequest(t, n=2, greedy=True, max_new_tokens=6, stop=None)) for t in texts]
    together = [h.result(timeout=60)[0] for h in handles]
    hold.join(30)
    assert (3, lengths.pop()) in shapes, shapes
    alone = make_engine(slots=12)
    for text, got in zip(texts, together):
        assert ids(got) == ids(alone.complete(text, n=2, greedy=True, max_new_tokens=6, stop=None)), text


def test_a_long_request_does_not_hold_back_a_short_one(make_engine):
    engine = make_engine(delay=0.005)
    long = engine.submit(CompletionRequest("Once upon a time", n=1, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: engine.scheduler.pool.busy())
    short = engine.submit(CompletionRequest("Hello there", n=1, greedy=True, max_new_tokens=3, stop=None))
    got, _ = short.result(timeout=60)
    assert got and len(got[0].token_ids) <= 3
    assert not long.done(), "the short request waited for the long one"
    done, _ = long.result(timeout=60)
    assert done[0].finish_reason == "length" and len(done[0].token_ids) == 100


def test_chunked_prefill_equals_one_pass(make_engine, monkeypatch):
    import model.serving.planner as planner

    text = long_document(150)
    alone = make_engine().complete(text, n=2, greedy=True, max_new_tokens=8, stop=None)
    monkeypatch.setattr(planner, "PREFILL_CHUNK", 16)  # a long prompt now takes many steps
    chunked = make_engine().completion(CompletionRequest(text, n=2, greedy=True, max_new_tokens=8, stop=None))
    assert chunked.timings.tokens_prefilled > 3 * 16
    assert ids(chunked.suggestions) == ids(alone)


@pytest.mark.parametrize("prefill_is_dear", [True, False])
def test_a_younger_long_prompt_waits_for_an_older_request_only_when_waiting_is_cheaper(make_engine, prefill_is_dear):
    """Older requests first: while the older one decodes a suggestion of a few words, the younger
    long prompt is prefilled beside it only if its prefill costs less than that decoding still
    takes (the engine's rates, set here); either way its suggestions are the one-pass ones."""
    text = long_document(150)
    alone = make_engine().complete(text, n=2, greedy=True, max_new_tokens=8, stop=None)
    engine = make_engine(delay=0.01)
    per_token, per_row = (1.0, 0.001) if prefill_is_dear else (0.001, 1.0)
    engine.scheduler.backlog.pace = lambda: (per_token, per_row)
    prefills, inner = [], engine.model.transformer.forward
    older = engine.submit(CompletionRequest("Once upon a time", n=2, greedy=True, max_new_tokens=16, stop=None))

    def forward(ids, *args, **kwargs):
        if ids.shape[1] > 1:
            prefills.append((ids.shape[1], older.done()))
        return inner(ids, *args, **kwargs)

    assert wait_until(lambda: engine.stats()["tokens_decoded"] > 0)
    engine.model.transformer.forward = forward
    assert not older.done()
    younger = engine.completion(CompletionRequest(text, n=2, greedy=True, max_new_tokens=8, stop=None))
    assert younger.timings.tokens_prefilled > 100 and prefills
    if prefill_is_dear:
        assert all(older_done for _, older_done in prefills), prefills
    else:
        assert not any(older_done for _, older_done in prefills), prefills
    assert ids(younger.suggestions) == ids(alone)
    assert len(older.result(timeout=60)[0][0].token_ids) == 16


def test_a_keystroke_copies_its_prefix_from_the_documents_running_request(make_engine):
    """The next keystroke arrives while the previous one's request still runs: its slot copies
    the document's keys/values from that request's slot instead of prefilling them."""
    text = long_document(60)  # nothing of it is cut to leave room for the running request's 60 tokens
    engine = make_engine(delay=0.01)
    running = engine.submit(CompletionRequest(text, n=1, greedy=True, max_new_tokens=60, stop=None))
    assert wait_until(lambda: engine.stats()["tokens_decoded"] > 0)
    assert engine.scheduler.pool.busy()
    typed = text + " and then"
    got = engine.completion(CompletionRequest(typed, n=2, greedy=True, max_new_tokens=6, stop=None))
    assert not running.done(), "the first request ended before the second came"
    prompt = prompt_of(engine, typed).tokens
    assert got.timings.tokens_reused >= len(prompt_of(engine, text).tokens) - 2
    assert got.timings.tokens_reused + got.timings.tokens_prefilled == len(prompt)
    fresh = make_engine().complete(typed, n=2, greedy=True, max_new_tokens=6, stop=None)
    assert ids(got.suggestions) == ids(fresh)
    running.result(timeout=60)


def test_a_donor_slot_holds_a_longer_prefix_busy_or_not():
    from model.serving.slots import SlotPool

    pool = SlotPool(3)
    (busy,), _ = pool.acquire([1, 2, 3, 4, 5], 1)
    pool.wrote(busy, [1, 2, 3, 4, 5])
    (base,), reuse = pool.acquire([1, 2, 3, 4, 9, 9], 1)
    assert reuse == 0 and base != busy
    assert pool.donor([1, 2, 3, 4, 9, 9], base) == (busy, 4)
    assert pool.donor([1, 2, 3, 4, 5], base) == (busy, 4)  # the last token is always prefilled, for its logits
    assert pool.donor([7, 8], base) is None


class _Planned:
    """Just what the planner reads of a request: its prompt, how much of it is in the cache, and
    once it decodes, its rows and how many tokens each has written of max_new_tokens."""

    def __init__(self, tokens: int, prefilled: int = 0, decoded: Optional[int] = None, max_new_tokens: int = 8,
                 rows: int = 2):
        self.prompt = type("Prompt", (), {"tokens": list(range(tokens))})()
        self.prefilled = prefilled
        self.max_new_tokens = max_new_tokens
        self.last_logits = None if decoded is None else object()
        self.rows = [] if decoded is None else [type("Row", (), {"tokens": [0] * decoded})() for _ in range(rows)]

    def live_rows(self):
        return self.rows


def test_the_prefill_budget_goes_to_the_oldest_requests_first():
    from model.serving.planner import PREFILL_BEHIND_DECODE, PREFILL_CHUNK, Planner

    def planned(plan, pace):
        return sorted(((job, end - start) for group in plan.prefill_chunks(pace) for job, start, end in group),
                      key=lambda p: p[1])

    cpu = (0.002, 0.06)  # gpt2 on one core: 2 ms a prompt token, 60 ms a decode step
    plan = Planner(pool=None)
    older, decoding, keystroke, document = _Planned(1000), _Planned(10, 10, decoded=3), _Planned(500, 495), _Planned(1000)
    plan.running = [older, decoding, document, keystroke]
    assert planned(plan, cpu) == [(older, PREFILL_CHUNK)]  # a younger request's decoding slows no older prompt
    older.prefilled = 990
    # 5 steps x 60 ms of decoding left, far less than 2 s of prefill: the long prompt waits its
    # turn, a keystroke's few tokens go on
    assert planned(plan, cpu) == [(keystroke, 5), (older, 10)]
    plan.running = [decoding, _Planned(500, 500 - PREFILL_BEHIND_DECODE)]
    assert planned(plan, cpu) == [(plan.running[1], PREFILL_BEHIND_DECODE)]
    plan.running = [decoding, document]
    assert planned(plan, (None, None)) == [(document, PREFILL_CHUNK)]  # no rates yet: nothing waits
    assert planned(plan, (0.00001, 0.06)) == [(document, PREFILL_CHUNK)]  # a cheap prefill goes on
    plan.running = [document, decoding]  # the long prompt is older: it is not held back
    assert planned(plan, cpu) == [(document, PREFILL_CHUNK)]
    # behind a long generation, a long prompt does not wait for its end...
    long_generation = _Planned(10, 10, decoded=0, max_new_tokens=200)
    plan.running = [long_generation, document]
    assert planned(plan, cpu) == [(document, PREFILL_CHUNK)]
    long_generation.rows[0].tokens = long_generation.rows[1].tokens = [0] * 190  # ...unless it is near it
    assert planned(plan, cpu) == []


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3),
                                      dict(temperature=1.3, top_p=1.0), dict(greedy=True, repetition_penalty=1.5)])
def test_engine_matches_the_plain_generation_path(engine, settings):
    """From an empty document (no healing) the engine's rows are `generate`'s continuations."""
    from model.serving.generation import generate

    seed = 99
    got = engine.complete("", n=3, seed=seed, max_new_tokens=10, stop=None, **settings)
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


# -- the pool: eviction and waiting --------------------------------------------------------------
DOCS = ["Alpha team walked to the park", "Bravo is what they said after", "Charlie wrote a letter to",
        "Delta of the river froze along", "Echo of the mill under a grey"]


def test_eviction_reuses_the_least_recently_used_slot(make_engine):
    engine = make_engine(slots=4)
    pool = engine.scheduler.pool

    def run(text):
        return engine.completion(CompletionRequest(text, n=1, greedy=True, max_new_tokens=6))

    first = {doc: run(doc) for doc in DOCS[:4]}  # fills the four slots

    def holders(doc):
        p = prompt_of(engine, doc).tokens
        return pool.holding(p)

    assert all(len(holders(doc)) == 1 for doc in DOCS[:4])
    run(DOCS[4])  # a fifth document: the least recently used slot (Alpha's) goes
    assert holders(DOCS[0]) == []
    assert all(len(holders(doc)) == 1 for doc in DOCS[1:])
    again = run(DOCS[0])  # Alpha again: computed from scratch in Bravo's old slot, and still right
    assert again.timings.tokens_reused == 0
    assert ids(again.suggestions) == ids(first[DOCS[0]].suggestions)
    assert holders(DOCS[1]) == []
    delta = run(DOCS[3])  # Delta was not evicted: everything but the last prompt token is reused
    assert delta.timings.tokens_reused == len(prompt_of(engine, DOCS[3]).tokens) - 1
    assert ids(delta.suggestions) == ids(first[DOCS[3]].suggestions)
    scratch = make_engine(slots=4)
    for doc in DOCS:
        assert ids(run(doc).suggestions) == ids(scratch.completion(
            CompletionRequest(doc, n=1, greedy=True, max_new_tokens=6)).suggestions)
    assert not pool.busy()


def test_a_request_needing_more_slots_than_free_waits_then_completes(make_engine):
    engine = make_engine(slots=4, delay=0.004)
    pool = engine.scheduler.pool
    first = engine.submit(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=30, stop=None))
    assert wait_until(lambda: len(pool.busy()) == 3)
    second = engine.submit(CompletionRequest("Hello there! How", n=2, greedy=True, max_new_tokens=5))
    with pytest.raises(BadRequest):  # more suggestions than the pool has slots can never run
        engine.submit(CompletionRequest("Hello", n=5))
    a, a_timings = first.result(timeout=60)
    b, b_timings = second.result(timeout=60)
    # The second request was admitted only once the first had released its slots.
    assert second.job.admitted >= first.job.submitted + a_timings.total_ms / 1000 - 1e-6
    assert b_timings.queue_ms > 0
    fresh = make_engine(slots=4)
    assert ids(a) == ids(fresh.complete(STORY, n=3, greedy=True, max_new_tokens=30, stop=None))
    assert ids(b) == ids(fresh.complete("Hello there! How", n=2, greedy=True, max_new_tokens=5))
    assert idle(engine)


# -- cancellation and time limits ----------------------------------------------------------------
def test_cancel_frees_the_slots(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    pool = engine.scheduler.pool
    running = engine.submit(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: len(pool.busy()) == 3)
    queued = engine.submit(CompletionRequest("Hello there", n=2, max_new_tokens=5))  # waits for slots
    queued.cancel()
    running.cancel()
    with pytest.raises(Cancelled):
        running.result(timeout=30)
    with pytest.raises(Cancelled):
        queued.result(timeout=30)
    assert idle(engine)
    # The engine goes on serving.
    assert_good_suggestions(engine.complete("Hello there", n=2, max_new_tokens=4, seed=1))


def test_cancel_behind_a_waiting_request_is_prompt(make_engine):
    """A cancelled or timed-out request that waits behind another waiting one is answered at once."""
    engine = make_engine(slots=4, delay=0.005)
    pool = engine.scheduler.pool
    running = engine.submit(CompletionRequest(STORY, n=4, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: len(pool.busy()) == 4)
    blocked = engine.submit(CompletionRequest("Hello there", n=2, greedy=True, max_new_tokens=4))
    behind = engine.submit(CompletionRequest("Once upon", n=1, greedy=True, max_new_tokens=4))
    limited = engine.submit(CompletionRequest("Once upon", n=1, greedy=True, max_new_tokens=4, max_time=0.05))
    behind.cancel()
    with pytest.raises(Cancelled):
        behind.result(timeout=30)
    assert limited.result(timeout=30)[0] == []  # out of time before it ever got a slot
    assert not running.done(), "the cancelled request waited for the running one to finish"
    assert running.result(timeout=60)[0] and blocked.result(timeout=60)[0]
    assert idle(engine)


def test_handle_timeout_raises_and_frees_the_slots(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    handle = engine.submit(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=100, stop=None))
    with pytest.raises(RequestTimeout):
        handle.result(timeout=0.001)
    assert idle(engine)
    with pytest.raises(Cancelled):  # the timed-out request was cancelled, not left running
        handle.result(timeout=30)
    with pytest.raises(RequestTimeout):
        engine.completion(CompletionRequest(STORY, n=1, max_new_tokens=100, stop=None), timeout=0.001)
    assert idle(engine)
    assert_good_suggestions(engine.complete(STORY, n=1, max_new_tokens=3, seed=2))


def test_max_time_returns_partial_suggestions(make_engine):
    engine = make_engine(slots=4, delay=0.01)
    done = engine.completion(CompletionRequest(STORY, n=2, greedy=True, max_new_tokens=120, stop=None,
                                               max_time=0.15))
    assert done.suggestions, "max_time returned nothing"
    for s in done.suggestions:
        assert s.finish_reason == "time"
        assert 0 < len(s.token_ids) < 120 and s.text.strip()
    # What was cut short is the start of the full answer.
    full = make_engine(slots=4).complete(STORY, n=2, greedy=True, max_new_tokens=120, stop=None)
    for part, whole in zip(done.suggestions, full):
        assert whole.token_ids[:len(part.token_ids)] == part.token_ids
    assert idle(engine)


# -- token healing ------------------------------------------------------------------------------
HEAL_TEXTS = ["Hel", "Hello wor", "The weather in the val", "Once upon a ti", "caf", "Z\u00fcr", "e-mail@exa"]


@pytest.mark.parametrize("greedy", [True, False])
def test_token_healing_spells_out_what_was_typed(engine, greedy):
    tok = engine.tokenizer
    for text in HEAL_TEXTS:
        heal = tok.token_bytes(tok.encode(text)[-1])
        prompt = prompt_of(engine, text, 6)
        assert prompt.heal == heal
        done = engine.completion(CompletionRequest(text, n=3, greedy=greedy, seed=7, max_new_tokens=6))
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
    done = engine.completion(CompletionRequest("H", n=2, greedy=True, max_new_tokens=4))
    assert done.healed == "H"
    for s in done.suggestions:
        assert engine.tokenizer.decode_bytes(s.token_ids).startswith(b"H")


# -- odd texts ----------------------------------------------------------------------------------
ODD_TEXTS = ["", " ", "   \t ", "\n\n", "😀", "A smile 😀", "e\u0301", "cafe\u0301 au lait", "שלום עולם",
             "مرحبا بالعالم", "\x00", "a\x00b", "\ud800", "abc\ud800", "\ud83d\ude00", "\ufeff", "🏳️‍🌈",
             "日本語", "\u200f\u200e"]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_texts_give_suggestions(engine, text):
    """Every odd text is cleaned and answered (a model with a start token needs no text at all)."""
    for greedy in (True, False):
        done = engine.completion(CompletionRequest(text, n=3, greedy=greedy, seed=3, max_new_tokens=5))
        assert_good_suggestions(done.suggestions, 3)
        cleaned = clean_text(text)
        prompt = prompt_of(engine, cleaned, 5)
        for s in done.suggestions:
            full = whole_characters(engine.tokenizer, prompt.tokens + s.token_ids)
            if prompt.tokens == [engine.eos]:
                full = whole_characters(engine.tokenizer, s.token_ids)
            assert clean_output(full).startswith(cleaned + s.text)  # no control characters in a suggestion
    assert idle(engine)


def test_over_long_document_is_cut_stably(make_engine):
    engine = make_engine()
    doc = long_document(3000)
    max_new = 8
    first = engine.completion(CompletionRequest(doc, n=2, greedy=True, max_new_tokens=max_new))
    assert_good_suggestions(first.suggestions, 2)
    assert first.timings.tokens_prefilled + first.timings.tokens_reused <= engine.config.n_positions - max_new
    for typed in [doc + " a", doc + " an", doc + " and"]:  # consecutive keystrokes
        done = engine.completion(CompletionRequest(typed, n=2, greedy=True, max_new_tokens=max_new))
        prompt = prompt_of(engine, typed, max_new)
        assert prompt.dropped_tokens > 0
        assert done.timings.tokens_prefilled + done.timings.tokens_reused == len(prompt.tokens)
        assert done.timings.tokens_reused >= 0.9 * len(prompt.tokens), "the keystroke missed the cache"
        assert_good_suggestions(done.suggestions, 2)
    fresh = make_engine().completion(CompletionRequest(doc + " and", n=2, greedy=True, max_new_tokens=max_new))
    assert ids(done.suggestions) == ids(fresh.suggestions)


# -- settings out of range ------------------------------------------------------------------------
BAD_SETTINGS = [dict(n=0), dict(n=100), dict(n=-1), dict(n=2.5), dict(n=True), dict(temperature=-1),
                dict(temperature=6), dict(temperature=float("nan")), dict(n="3"), dict(top_k=True), dict(top_p=2), dict(top_p=0),
                dict(top_p=float("nan")), dict(top_k=-1), dict(max_new_tokens=0), dict(max_new_tokens=10000),
                dict(stop=123), dict(stop="sometimes"), dict(stop=["ok", 5]), dict(seed=-1), dict(seed="x"),
                dict(repetition_penalty=0), dict(max_time=-1), dict(text="a" * 2_000_000), dict(text=b"bytes"),
                dict(text=42)]


def test_out_of_range_settings_raise_bad_request_and_change_nothing(engine):
    engine.complete("Hello", n=1, max_new_tokens=2, seed=0)
    before = engine.stats()
    pool_before = [engine.scheduler.pool.held(i) for i in range(engine.scheduler.pool.size)]
    for bad in BAD_SETTINGS:
        fields = dict(text="Hello there", n=2, max_new_tokens=4)
        fields.update(bad)
        with pytest.raises(BadRequest) as e:
            engine.completion(CompletionRequest(**fields))
        assert e.value.message
        with pytest.raises(BadRequest):
            engine.submit(CompletionRequest(**fields))
        text = fields.pop("text")
        with pytest.raises(BadRequest):
            engine.complete(text, **fields)
    assert engine.stats() == before
    assert [engine.scheduler.pool.held(i) for i in range(engine.scheduler.pool.size)] == pool_before
    assert not engine.scheduler.pool.busy()


# -- many threads -------------------------------------------------------------------------------
def test_many_threads_each_get_their_own_answer(make_engine):
    shared = make_engine(slots=8)
    threads, per_thread = 12, 3
    texts = {(t, j): f"{corpus_lines()[(t + j) % len(corpus_lines())][: 20 + 7 * j + t]}"
             for t in range(threads) for j in range(per_thread)}
    answers, errors = {}, []
    start = threading.Barrier(threads)

    def caller(t):
        try:
            start.wait()
            for j in range(per_thread):
                answers[(t, j)] = ids(shared.complete(texts[(t, j)], n=2, greedy=True, max_new_tokens=5))
        except Exception as e:  # reported below, with the thread it happened in
            errors.append((t, repr(e)))

    pool = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in pool), "deadlock: a caller never got an answer"
    assert not errors, errors
    alone = make_engine(slots=8)
    for key, text in texts.items():
        assert answers[key] == ids(alone.complete(text, n=2, greedy=True, max_new_tokens=5)), text
    assert shared.stats()["requests"] == threads * per_thread
    assert idle(shared)


def test_classify_answer_and_score_alongside_completions(make_engine, tiny_gpt2_heads):
    shared = make_engine(path=tiny_gpt2_heads, slots=4)
    alone = make_engine(path=tiny_gpt2_heads, slots=4)
    context = "The library is next to the park. It opens at nine."
    jobs = [("complete", t) for t in BATCH_TEXTS] + [("classify", t) for t in BATCH_TEXTS[:3]] + \
           [("score", t) for t in BATCH_TEXTS[:3]] + [("answer", "When does it open?")]

    def run(e, kind, text):
        if kind == "complete":
            return ids(e.complete(text, n=2, greedy=True, max_new_tokens=6))
        if kind == "classify":
            return [(l.label, round(l.score, 5)) for l in e.classify(text).labels]
        if kind == "score":
            return [(t.token_id, round(t.prob, 5)) for t in e.score(text).tokens]
        a = e.answer(text, context)
        return (a.text, a.start, a.end)

    results, errors = {}, []

    def caller(i, kind, text):
        try:
            results[i] = run(shared, kind, text)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=caller, args=(i, k, t)) for i, (k, t) in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads) and not errors, errors
    for i, (kind, text) in enumerate(jobs):
        assert results[i] == run(alone, kind, text), (kind, text)


def test_all_model_work_runs_on_the_scheduler_thread(make_engine, tiny_gpt2_heads):
    """Completions, classification (head and zero-shot), scores and extracted answers: one thread
    does every forward pass, so the process keeps one OpenMP pool (model/threads.py)."""
    engine = make_engine(path=tiny_gpt2_heads, slots=4)
    seen = []
    for module in [engine.model.transformer, *engine.extra_heads.values()]:
        inner = module.forward

        def forward(*args, _inner=inner, **kwargs):
            seen.append(threading.current_thread())
            return _inner(*args, **kwargs)

        module.forward = forward
    engine.complete(STORY, n=2, max_new_tokens=4)
    engine.classify(STORY)
    engine.classify(STORY, labels=["weather", "sport"])
    engine.score(STORY)
    engine.answer("What covered the valley?", STORY)
    assert len(seen) >= 5
    assert set(seen) == {engine.run(threading.current_thread)}


def test_run_returns_results_and_raises_errors_on_the_model_thread(make_engine):
    engine = make_engine(slots=2)
    assert engine.run(threading.current_thread) is not threading.current_thread()
    assert engine.scheduler.on_model_thread() is False
    with pytest.raises(ZeroDivisionError):
        engine.run(lambda: 1 / 0)
    assert engine.run(lambda: 6 * 7) == 42  # the loop survives a failing call
    assert engine.complete("Hello", n=1, greedy=True, max_new_tokens=3)
    engine.close()
    with pytest.raises(Cancelled):
        engine.run(lambda: 1)


def test_engines_of_a_process_share_one_model_thread(make_engine, tiny_openai):
    """Two models at once (the Compare tab): one thread takes turns; each answers as it would alone;
    one failing or closing leaves the other working."""
    from model.serving.threads import model_thread

    a, b = make_engine(slots=4), make_engine(path=tiny_openai, slots=4)
    assert a.run(threading.current_thread) is b.run(threading.current_thread) is model_thread(torch.device("cpu")).thread
    assert model_thread(torch.device("cuda")) is not model_thread(torch.device("cpu"))  # GPUs keep their own
    expected = {e: ids(e.complete(STORY, n=2, greedy=True, max_new_tokens=8, stop=None)) for e in (a, b)}
    results, errors = {}, []

    def caller(engine, i):
        try:
            results[(engine, i)] = ids(engine.complete(STORY, n=2, greedy=True, max_new_tokens=8, stop=None))
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=caller, args=(e, i)) for e in (a, b) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and len(results) == 6
    assert all(got == expected[engine] for (engine, _), got in results.items())

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    a.model.transformer.forward = broken
    with pytest.raises(Exception, match="internal error"):
        a.complete("Something new entirely", n=1, max_new_tokens=3)
    assert ids(b.complete(STORY, n=2, greedy=True, max_new_tokens=8, stop=None)) == expected[b]
    a.close()
    assert ids(b.complete(STORY, n=2, greedy=True, max_new_tokens=8, stop=None)) == expected[b]


def test_close_cancels_what_is_pending(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    running = engine.submit(CompletionRequest(STORY, n=4, greedy=True, max_new_tokens=100, stop=None))
    waiting = engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4))
    engine.close()
    for handle in (running, waiting):
        with pytest.raises(Cancelled):
            handle.result(timeout=30)
    with pytest.raises(Cancelled):
        engine.submit(CompletionRequest("Hello", n=1))


# -- bookkeeping --------------------------------------------------------------------------------
def test_stats_add_up(make_engine):
    engine = make_engine()
    texts = [STORY, STORY + " roads", "Hello there! How are you", "", "Hel"]
    total = {"tokens_prefilled": 0, "tokens_reused": 0, "tokens_decoded": 0}
    for i, text in enumerate(texts):
        done = engine.completion(CompletionRequest(text, n=2, seed=i, max_new_tokens=6))
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
    assert stats["slots"] == 8 and stats["memory_bytes"] > stats["cache_bytes"] > 0


# -- stop rules ---------------------------------------------------------------------------------
def test_stop_auto_none_and_list(engine):
    tok = engine.tokenizer
    for text in ["The market opened early on Monday", "Hello there! How are you today? I", STORY]:
        free = engine.complete(text, n=1, greedy=True, max_new_tokens=40, stop=None)[0]
        assert free.finish_reason in ("length", "eos")
        if free.finish_reason == "length":
            assert len(free.token_ids) == 40
        auto = engine.complete(text, n=1, greedy=True, max_new_tokens=40, stop="auto")[0]
        assert auto.token_ids == free.token_ids[:len(auto.token_ids)]
        cut, stopped = apply_stop(free.text, "auto")
        assert auto.text == cut
        assert auto.finish_reason == ("stop" if stopped else free.finish_reason)
        if stopped:
            assert len(auto.token_ids) < 40
        # A list of stop strings: cut at the first one, decoding no further than needed.
        for stops in (["e"], [" ", "\n"], [",", "."]):
            listed = engine.complete(text, n=1, greedy=True, max_new_tokens=40, stop=stops)
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
        free = engine.complete(STORY, n=3, seed=seed, max_new_tokens=20, stop=None)
        listed = engine.complete(STORY, n=3, seed=seed, max_new_tokens=20, stop=["e", "a"])
        for s in listed:
            assert "e" not in s.text and "a" not in s.text and s.text.strip()
        for s, f in zip(listed, free):
            if s.token_ids == f.token_ids[:len(s.token_ids)] and s.finish_reason == "stop":
                assert f.text.startswith(s.text) and f.text[len(s.text)] in "ea"


@pytest.mark.parametrize("text", ["", "The market opened", "Hello there! How are you today? I hope"])
def test_suggestions_are_distinct_and_non_empty(engine, text):
    for seed in range(3):
        assert_good_suggestions(engine.complete(text, n=5, seed=seed, max_new_tokens=6), 5)
        assert_good_suggestions(engine.complete(text, n=5, seed=seed, max_new_tokens=6, stop=None), 5)
    assert_good_suggestions(engine.complete(text, n=5, greedy=True, max_new_tokens=6), 5)


# -- classify, answer, score ----------------------------------------------------------------------
def test_classify_with_a_head(heads_engine):
    assert "sequence-classification" in heads_engine.heads
    for text in ["I love this, it is wonderful.", "x", "😀 \ud800"]:
        c = heads_engine.classify(text)
        assert c.method == "head"
        assert {l.label for l in c.labels} == {"NEGATIVE", "POSITIVE"}
        assert sum(l.score for l in c.labels) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= l.score <= 1.0 for l in c.labels)
        assert c.labels[0].score >= c.labels[1].score
    with pytest.raises(BadRequest):
        heads_engine.classify("   ")


def test_classify_zero_shot(engine):
    labels = ["weather", "sports", "music"]
    c = engine.classify(STORY, labels=labels)
    assert c.method == "zero-shot"
    assert sorted(l.label for l in c.labels) == sorted(labels)
    assert sum(l.score for l in c.labels) == pytest.approx(1.0, abs=1e-5)
    assert [l.score for l in c.labels] == sorted((l.score for l in c.labels), reverse=True)
    # A different order of candidates gives the same probabilities.
    c2 = engine.classify(STORY, labels=list(reversed(labels)))
    assert {l.label: l.score for l in c2.labels} == pytest.approx({l.label: l.score for l in c.labels}, abs=1e-5)
    with pytest.raises(BadRequest):
        engine.classify(STORY)  # no head, no labels
    with pytest.raises(BadRequest):
        engine.classify(STORY, labels=["only one"])
    with pytest.raises(BadRequest):
        engine.classify(STORY, labels=["same", "same"])
    with pytest.raises(BadRequest):
        engine.classify("", labels=labels)


def test_zero_shot_is_the_mean_label_likelihood(engine):
    """Labels of different token lengths are padded together; padding must not change their scores."""
    import torch

    from model.serving.engine import ZERO_SHOT_SUFFIX

    labels = ["snow", "a long winter night", "music"]
    got = {l.label: l.score for l in engine.classify(STORY, labels=labels).labels}
    tok = engine.tokenizer
    prompt = tok.encode(STORY) + tok.encode(ZERO_SHOT_SUFFIX)
    means = []
    for label in labels:
        lab = tok.encode(" " + label)
        with torch.inference_mode():
            logp = engine.model(torch.tensor([prompt + lab], device=engine.device))[0].float().log_softmax(-1)
        means.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(lab)) / len(lab))
    want = torch.tensor(means).softmax(-1).tolist()
    assert [got[l] for l in labels] == pytest.approx(want, abs=1e-4)


def test_answer_with_a_qa_head(heads_engine):
    context = "The library is next to the park. It opens at nine in the morning. A teacher wrote the book."
    for question in ["When does the library open?", "Who wrote the book?", "Where? 😀"]:
        a = heads_engine.answer(question, context)
        assert a.generated is False
        assert a.start is not None and a.end is not None
        assert 0 <= a.start <= a.end <= len(context)
        assert context[a.start:a.end] == a.text
        assert 0.0 <= a.score <= 1.0
    with pytest.raises(BadRequest):
        heads_engine.answer("", context)
    with pytest.raises(BadRequest):
        heads_engine.answer("Who?", " ")


def test_answer_with_a_plain_lm_is_generated(engine):
    context = "The library is next to the park. It opens at nine in the morning."
    a = engine.answer("Where is the library?", context)
    assert a.generated is True
    assert 0.0 <= a.score <= 1.0
    at = context.lower().find(a.text.lower()) if a.text else -1
    if at >= 0:  # a generated answer that quotes the context points at the quote
        assert (a.start, a.end) == (at, at + len(a.text))
    else:
        assert a.start is None and a.end is None
    assert not engine.scheduler.pool.busy()


@pytest.mark.parametrize("text", ["Hello there! How are you today?", "😀 café e\u0301 שלום", "a", " spaces  "])
def test_score_every_token(engine, text):
    s = engine.score(text)
    ids_ = engine.tokenizer.encode(text)
    assert [t.token_id for t in s.tokens] == ids_
    assert "".join(t.text for t in s.tokens) == text
    for t in s.tokens:
        assert 0.0 < t.prob <= 1.0
        assert t.rank >= 1
    with pytest.raises(BadRequest):
        engine.score("")


def test_score_matches_the_model(engine):
    import torch

    text = "The weather in the valley"
    s = engine.score(text)
    ids_ = [engine.eos] + engine.tokenizer.encode(text)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids_], device=engine.device))[0].float().cpu()
    probs = logits.softmax(-1)
    for i, t in enumerate(s.tokens):
        assert t.prob == pytest.approx(float(probs[i, t.token_id]), rel=1e-4)
        assert t.rank == int((probs[i] > probs[i, t.token_id]).sum()) + 1


# -- openai-gpt ---------------------------------------------------------------------------------
def test_openai_gpt_completes_without_healing(tiny_openai):
    engine = Engine.from_pretrained(str(tiny_openai), slots=4, device=DEVICE)
    try:
        done = engine.completion(CompletionRequest("Once upon a time there was a", n=3, seed=5, max_new_tokens=6))
        assert done.healed == ""
        assert_good_suggestions(done.suggestions, 3)
        greedy = engine.completion(CompletionRequest("The weather in the", n=2, greedy=True, max_new_tokens=6))
        assert_good_suggestions(greedy.suggestions, 2)
        again = engine.completion(CompletionRequest("The weather in the valley", n=2, greedy=True,
                                                    max_new_tokens=6))
        assert again.timings.tokens_reused > 0
        with pytest.raises(BadRequest, match="empty"):
            engine.complete("", n=1)
        assert not engine.scheduler.pool.busy()
    finally:
        engine.close()


def test_typed_end_of_text_marker_is_plain_text(engine):
    """A person typing "<|endoftext|>" means those characters, not the model's end-of-text token."""
    ids = engine.tokenizer.encode("Hello<|endoftext|>")
    assert engine.eos not in ids
    assert engine.tokenizer.decode(ids) == "Hello<|endoftext|>"
    assert_good_suggestions(engine.complete("Hello<|endoftext|>", n=2, max_new_tokens=5, seed=0))


def test_zero_max_time_is_rejected(engine):
    with pytest.raises(BadRequest, match="max_time"):
        engine.complete("Hello", max_time=0)


# -- many writers: documents typed in turn keep their prefixes -------------------------------------

SHARED_FIRST_WORD = ["The keeper of the lighthouse climbed the stairs every night to light the lamp",
                     "The river ran dark under the bridge while the town slept",
                     "The market opened before dawn and the traders set out their fruit"]
SHARED_SENTENCE = ["It was a cold morning in the north of the country. " + tail
                   for tail in ("A boy walked to school", "The baker lit his oven", "Two dogs barked at a cart")]


def keystroke(engine: Engine, text: str, seed: int):
    done = engine.completion(CompletionRequest(text=text, n=3, max_new_tokens=4, seed=seed))
    return done.timings, prompt_of(engine, text, 4).tokens


@pytest.mark.parametrize("docs", [SHARED_FIRST_WORD, SHARED_SENTENCE], ids=["first-word", "first-sentence"])
def test_documents_typed_in_turn_prefill_only_what_was_typed(make_engine, docs):
    """Enough slots for all: every keystroke after a document's first prefills only the new words
    (and the healed last token), however many leading tokens the documents share."""
    engine = make_engine(slots=3 * len(docs) + 2)
    texts, before = list(docs), {}
    for r in range(4):
        for d in range(len(texts)):
            texts[d] += f" and word{r}"
            timings, prompt = keystroke(engine, texts[d], seed=r)
            if d in before:
                shared = common_prefix(before[d], prompt)
                assert shared >= len(before[d]) - 1  # the new prompt extends the old one
                # at least the old prompt; more when a suggestion's healed first token is what was typed
                assert timings.tokens_reused >= shared, (r, d, timings)
                assert timings.tokens_prefilled == len(prompt) - timings.tokens_reused
            before[d] = prompt


def test_with_fewer_slots_than_documents_the_least_recently_typed_loses_its_prefix(make_engine):
    engine = make_engine(slots=4)
    docs = {name: f"The {name} story begins here with a long first line about {name}"
            for name in ("alpha", "beta", "gamma", "delta", "epsilon")}
    prompts = {}

    def typed(name: str, request_n: int = 1):
        docs[name] += " more"
        done = engine.completion(CompletionRequest(text=docs[name], n=request_n, max_new_tokens=3, seed=0))
        reused, old = done.timings.tokens_reused, prompts.get(name)
        prompts[name] = prompt_of(engine, docs[name], 3).tokens
        return reused, old

    for name in ("alpha", "beta", "gamma", "delta", "alpha", "beta"):  # 4 documents, 4 slots
        typed(name)
    typed("epsilon")  # a fifth: gamma was typed least recently
    for name in ("delta", "alpha", "beta"):
        reused, old = typed(name)
        assert reused >= len(old) - 1, name  # still held
    reused, old = typed("gamma")
    assert reused < len(old) // 2  # evicted: only the shared first word or so is left somewhere


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


# -- admission control --------------------------------------------------------------------------
def _hold_every_slot(engine: Engine):
    """A long request on all four slots, so what comes next waits (slowed engine)."""
    running = engine.submit(CompletionRequest(STORY, n=4, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: len(engine.scheduler.pool.busy()) == 4)
    return running


def test_a_full_waiting_list_refuses_at_once_and_changes_nothing(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    engine.scheduler.max_waiting = 3
    running = _hold_every_slot(engine)
    waiting = [engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4)) for _ in range(3)]
    before, queued = engine.stats(), list(engine.scheduler.planner.waiting)
    with pytest.raises(Busy) as refused:
        engine.submit(CompletionRequest("Once upon", n=1, max_new_tokens=4))
    assert refused.value.kind == "busy"
    assert refused.value.message == f"busy: 3 requests are waiting for {engine.name}; try again in a moment"
    assert not running.done(), "the refusal waited for the running request"
    assert engine.stats() == before and list(engine.scheduler.planner.waiting) == queued
    waiting[0].cancel()  # a cancelled request holds no waiting place
    accepted = engine.submit(CompletionRequest("Once upon", n=1, max_new_tokens=4))
    for handle in [running, accepted, *waiting[1:]]:
        handle.cancel()
    assert idle(engine)
    engine.scheduler.max_waiting = None
    assert_good_suggestions(engine.complete("Hello there", n=2, max_new_tokens=4, seed=1))


def test_one_client_holds_at_most_its_share_of_the_waiting_list(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    engine.scheduler.max_waiting, engine.scheduler.max_waiting_per_client = 10, 2
    running = _hold_every_slot(engine)
    mine = [engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4), client="10.0.0.1")
            for _ in range(2)]
    with pytest.raises(Busy, match="2 of your requests are already waiting"):
        engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4), client="10.0.0.1")
    others = [engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4), client="10.0.0.2"),
              engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4))]  # no client: not counted
    mine[0].cancel()
    mine.append(engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4), client="10.0.0.1"))
    for handle in [running, *mine, *others]:
        handle.cancel()
    assert idle(engine)


def test_time_spent_waiting_counts_toward_max_time(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    running = _hold_every_slot(engine)
    limited = engine.submit(CompletionRequest("Once upon", n=1, greedy=True, max_new_tokens=50, max_time=0.3))
    assert limited.job.deadline == pytest.approx(limited.job.submitted + 0.3)
    suggestions, timings = limited.result(timeout=30)
    assert suggestions == []  # its whole max_time went by in the waiting list
    assert not running.done(), "max_time started only when the request got its slots"
    assert timings.total_ms >= 300
    running.cancel()
    assert idle(engine)


def test_the_backlog_estimate_is_the_work_left_in_the_engine_over_its_recent_rates():
    from types import SimpleNamespace

    from model.serving.backlog import WINDOW_S, Backlog

    now = [100.0]
    backlog = Backlog(clock=lambda: now[0])
    job = SimpleNamespace(prompt=SimpleNamespace(tokens=list(range(300))), prefilled=100, n=2, max_new_tokens=10,
                          rows=[SimpleNamespace(tokens=[1, 2, 3, 4])])
    assert backlog.expected_wait([job]) is None  # nothing has run yet: no rate known
    backlog.prefill.add(200, 1.0)
    backlog.prefill.add(200, 1.0)  # 200 prompt tokens a second
    backlog.decode.add(8, 1.0)     # 8 suggestion tokens a second
    # 200 prompt tokens left (1 s) and 2 x 10 - 4 = 16 suggestion tokens (2 s)
    assert backlog.expected_wait([job]) == pytest.approx(3.0)
    assert backlog.expected_wait([job, job]) == pytest.approx(6.0)
    assert backlog.expected_wait([]) == 0.0  # an idle engine is never behind
    now[0] += WINDOW_S + 1
    backlog.prefill.add(100, 1.0)  # the window holds only the new sample now
    assert backlog.expected_wait([job]) == pytest.approx(2.0 + 2.0)
    now[0] += WINDOW_S + 1
    assert backlog.expected_wait([job]) == pytest.approx(2.0 + 2.0)  # idle since: the last rates stand
    backlog.turn(3.0, 2.0)  # turns take half as long again as their prefill and decode
    assert backlog.expected_wait([job]) == pytest.approx((2.0 + 2.0) * 1.5)


def test_an_engine_too_far_behind_refuses_at_once_and_changes_nothing(make_engine):
    engine = make_engine(slots=4, delay=0.02)
    engine.completion(CompletionRequest("Hello there", n=1, max_new_tokens=4, seed=1))  # the rates
    engine.scheduler.max_wait_s = 0.5
    running = _hold_every_slot(engine)  # 4 x 100 tokens to decode: seconds of work at 0.02 s a step
    behind = engine.scheduler.backlog.expected_wait(engine.scheduler.planner.running)
    assert behind > 0.5, behind
    queued = list(engine.scheduler.planner.waiting)
    with pytest.raises(Busy, match=rf"busy: {engine.name} is about (\d\.\d|\d\d+) s behind; try again in a moment"):
        engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4))
    assert list(engine.scheduler.planner.waiting) == queued  # a refusal queues nothing
    engine.scheduler.max_wait_s = behind * 10  # far enough: accepted
    accepted = engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4))
    for handle in [running, accepted]:
        handle.cancel()
    assert idle(engine)
    engine.scheduler.max_wait_s = 0.5  # an idle engine accepts whatever it was told before
    assert_good_suggestions(engine.complete("Hello there", n=2, max_new_tokens=4, seed=1))
