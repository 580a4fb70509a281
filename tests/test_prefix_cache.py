"""The prefix cache: a document's keys and values reused across keystrokes, forks and documents.

Every reused result is compared with the same request computed from scratch on a fresh engine;
a full cache evicts by its policy (eviction.py), and a running request lends its prefix.
"""

from __future__ import annotations

import pytest

from model import Engine
from model.serving.slots import common_prefix
from model.serving.engine_config import EngineConfig
from model.types import CompletionRequest
from model_support import STORY, assert_good_suggestions, ids, long_document, prompt_of, suggest, wait_until


def test_reused_prefix_equals_from_scratch(make_engine):
    warm = make_engine()
    first = warm.complete(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=8))
    assert first.timings.tokens_reused == 0
    assert first.timings.tokens_prefilled == len(prompt_of(warm, STORY).tokens)
    base = prompt_of(warm, STORY).tokens
    for text in [STORY + " roads, the river froze",  # typed on
                 STORY + " roads, the river froze along",  # and on
                 STORY.replace("cold", "warm") + " roads",  # an edit in the middle
                 STORY[:-12]]:  # backspace
        got = warm.complete(CompletionRequest(text, n=3, greedy=True, max_new_tokens=8))
        prompt = prompt_of(warm, text).tokens
        t = got.timings
        assert t.tokens_prefilled + t.tokens_reused == len(prompt)
        assert t.tokens_reused >= min(common_prefix(base, prompt), len(prompt) - 1)
        assert t.tokens_reused > 0
        scratch = make_engine().complete(CompletionRequest(text, n=3, greedy=True, max_new_tokens=8))
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
    forked = suggest(engine, text, n=3, seed=seed, max_new_tokens=10, stop=None)
    assert len(forked) == 3
    again = suggest(engine, text, n=3, seed=seed, max_new_tokens=10, stop=None)  # through the prefix cache
    assert ids(again) == ids(forked)
    for i in range(3):
        alone = suggest(make_engine(), text, n=1, seed=seed + i, max_new_tokens=10, stop=None)
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
                        lambda self, *a, **kw: groups.append(a[2].shape[0]) or inner(self, *a, **kw))
    shared = suggest(make_engine(), text, n=3, seed=seed, max_new_tokens=10, stop=None)
    assert groups and max(groups) == 3
    for i in range(3):
        alone = suggest(make_engine(), text, n=1, seed=seed + i, max_new_tokens=10, stop=None)
        assert alone[0].token_ids == shared[i].token_ids


def test_a_keystroke_copies_its_prefix_from_the_documents_running_request(make_engine):
    """The next keystroke arrives while the previous one's request still runs: its slot copies
    the document's keys/values from that request's slot instead of prefilling them."""
    text = long_document(60)  # nothing of it is cut to leave room for the running request's 60 tokens
    # The slowed running request puts this engine ~0.7 s behind, near the 1 s pace bound: not what is tested here.
    engine = make_engine(delay=0.01, config=EngineConfig(max_wait_s=None))
    running = engine.submit(CompletionRequest(text, n=1, greedy=True, max_new_tokens=60, stop=None))
    assert wait_until(lambda: engine.stats()["tokens_decoded"] > 0)
    assert engine.scheduler.pool.busy()
    typed = text + " and then"
    got = engine.complete(CompletionRequest(typed, n=2, greedy=True, max_new_tokens=6, stop=None))
    assert not running.done(), "the first request ended before the second came"
    prompt = prompt_of(engine, typed).tokens
    assert got.timings.tokens_reused >= len(prompt_of(engine, text).tokens) - 2
    assert got.timings.tokens_reused + got.timings.tokens_prefilled == len(prompt)
    fresh = suggest(make_engine(), typed, n=2, greedy=True, max_new_tokens=6, stop=None)
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


DOCS = ["Alpha team walked to the park", "Bravo is what they said after", "Charlie wrote a letter to",
        "Delta of the river froze along", "Echo of the mill under a grey"]


def _exactly_fits(make_engine, docs, run, **config):
    """An engine whose KV cache holds exactly what `docs`, each run once, leave held (measured on a
    roomy engine first)."""
    roomy = make_engine(slots=4)
    for doc in docs:
        run(roomy, doc)
    used = roomy.stats()["kv_tokens_used"]
    return make_engine(config=EngineConfig(kv_tokens=used, rows=4, **config))


@pytest.mark.parametrize("policy, leaves", [("next-use", 3), ("lru", 0)])
def test_a_full_cache_evicts_the_document_its_policy_names(make_engine, policy, leaves):
    """Four documents fill the cache; a fifth evicts one: under least recently used the first typed,
    under next-use the newest of those seen only once. Every answer equals a fresh engine's."""
    def run(engine, text):
        return engine.complete(CompletionRequest(text, n=1, greedy=True, max_new_tokens=6))

    engine = _exactly_fits(make_engine, DOCS[:4], run, max_wait_s=None, kv_eviction=policy)
    pool = engine.scheduler.pool
    first = {doc: run(engine, doc) for doc in DOCS[:4]}

    def holders(doc):
        return pool.holding(prompt_of(engine, doc).tokens)

    assert all(len(holders(doc)) == 1 for doc in DOCS[:4]) and engine.stats()["evictions"] == 0
    run(engine, DOCS[4])  # a fifth document: one held document goes
    assert holders(DOCS[leaves]) == [] and engine.stats()["evictions"] >= 1
    kept = [doc for i, doc in enumerate(DOCS[:4]) if i != leaves]
    for doc in kept:
        assert len(holders(doc)) == 1, doc
    again = run(engine, DOCS[leaves])  # computed from scratch, and still right
    assert again.timings.tokens_reused == 0
    assert ids(again.suggestions) == ids(first[DOCS[leaves]].suggestions)
    scratch = make_engine(slots=4)
    for doc in DOCS:
        assert ids(run(engine, doc).suggestions) == ids(run(scratch, doc).suggestions)
    assert not pool.busy()


SHARED_FIRST_WORD = ["The keeper of the lighthouse climbed the stairs every night to light the lamp",
                     "The river ran dark under the bridge while the town slept",
                     "The market opened before dawn and the traders set out their fruit"]


SHARED_SENTENCE = ["It was a cold morning in the north of the country. " + tail
                   for tail in ("A boy walked to school", "The baker lit his oven", "Two dogs barked at a cart")]


def keystroke(engine: Engine, text: str, seed: int):
    done = engine.complete(CompletionRequest(text=text, n=3, max_new_tokens=4, seed=seed))
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


@pytest.mark.parametrize("policy, loses", [("lru", "gamma"), ("next-use", "delta")])
def test_past_capacity_the_policy_decides_who_loses_their_prefix(make_engine, policy, loses):
    """Alpha and beta are typed twice, gamma and delta once; a fifth document needs room. Least
    recently used evicts gamma (typed longest ago); next-use keeps the documents that came back and
    evicts the newest of those typed once (delta)."""
    names = ("alpha", "beta", "gamma", "delta", "epsilon")
    docs = {name: f"The {name} story begins here with a long first line about {name}" for name in names}
    prompts = {}

    def typed(engine, name: str):
        docs[name] += " more"
        done = engine.complete(CompletionRequest(text=docs[name], n=1, max_new_tokens=3, seed=0))
        reused, old = done.timings.tokens_reused, prompts.get(name)
        prompts[name] = prompt_of(engine, docs[name], 3).tokens
        return reused, old

    order = ("alpha", "beta", "gamma", "delta", "alpha", "beta")
    roomy = make_engine(slots=4)
    for name in order:
        typed(roomy, name)
    used = roomy.stats()["kv_tokens_used"]
    docs.update({name: f"The {name} story begins here with a long first line about {name}" for name in names})
    prompts.clear()
    engine = make_engine(config=EngineConfig(kv_tokens=used, rows=4, max_wait_s=None, kv_eviction=policy))
    for name in order:  # 4 documents: all held
        typed(engine, name)
    typed(engine, "epsilon")
    for name in [n for n in names[:4] if n != loses]:
        reused, old = typed(engine, name)
        assert reused >= len(old) - 1, name  # still held
    reused, old = typed(engine, loses)
    assert reused < len(old) // 2  # evicted: only the shared first word or so is left somewhere


def test_over_long_document_is_cut_stably(make_engine):
    engine = make_engine()
    doc = long_document(3000)
    max_new = 8
    first = engine.complete(CompletionRequest(doc, n=2, greedy=True, max_new_tokens=max_new))
    assert_good_suggestions(first.suggestions, 2)
    assert first.timings.tokens_prefilled + first.timings.tokens_reused <= engine.config.n_positions - max_new
    for typed in [doc + " a", doc + " an", doc + " and"]:  # consecutive keystrokes
        done = engine.complete(CompletionRequest(typed, n=2, greedy=True, max_new_tokens=max_new))
        prompt = prompt_of(engine, typed, max_new)
        assert prompt.dropped_tokens > 0
        assert done.timings.tokens_prefilled + done.timings.tokens_reused == len(prompt.tokens)
        assert done.timings.tokens_reused >= 0.9 * len(prompt.tokens), "the keystroke missed the cache"
        assert_good_suggestions(done.suggestions, 2)
    fresh = make_engine().complete(CompletionRequest(doc + " and", n=2, greedy=True, max_new_tokens=max_new))
    assert ids(done.suggestions) == ids(fresh.suggestions)
