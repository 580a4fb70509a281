"""Many visitors per engine: the KV cache holds documents by their length, shares what they have in
common, and past capacity keeps a stable set of documents warm instead of none.

Documents of about 65 tokens are typed in turn (one word, then 3 suggestions of 4 tokens) on the
tiny model with today's default cache memory (16 x 256 = 4,096 positions). A keystroke "reuses its
document" when it prefills only what was typed since the document's last keystroke.
"""

from __future__ import annotations

import random

import pytest

from model.errors import BadRequest
from model.serving.engine_config import EngineConfig
from model.types import CompletionRequest
from model_support import ids, long_document, prompt_of

WORDS = sorted(set(long_document(4000).split()))


def documents(count: int, words: int = 25) -> list[str]:
    """`count` different texts of `words` words of the corpus (about 65 tokens), each its own draw."""
    return [" ".join(random.Random(d).choices(WORDS, k=words)) for d in range(count)]


def typed_in_turn(engine, count: int, rounds: int) -> tuple[float, list[int]]:
    """Type `count` documents in turn for `rounds` keystrokes each after a first one; (the share of
    later keystrokes that reused their document, prompt sizes seen)."""
    texts, before, reused, total, sizes = documents(count), {}, 0, 0, []
    for r in range(rounds + 1):
        for d in range(count):
            texts[d] += f" and{r}"
            done = engine.complete(CompletionRequest(text=texts[d], n=3, max_new_tokens=4, seed=r))
            prompt = prompt_of(engine, texts[d], 4).tokens
            sizes.append(len(prompt))
            if r:
                total += 1
                reused += done.timings.tokens_reused >= len(before[d]) - 1
            before[d] = prompt
    return reused / total, sizes


@pytest.fixture
def default_cache(make_engine):
    def make(policy="next-use"):
        engine = make_engine(slots=None, config=EngineConfig(max_wait_s=None, kv_eviction=policy))
        assert engine.stats()["kv_tokens"] == 16 * 256  # today's default cache memory for this model
        return engine
    return make


@pytest.mark.parametrize("count, least", [(28, 0.9), (56, 0.7)])
def test_documents_typed_in_turn_reuse_their_prefix_past_the_old_slot_count(default_cache, count, least):
    engine = default_cache()
    share, sizes = typed_in_turn(engine, count, rounds=3)
    assert 55 <= sorted(sizes)[len(sizes) // 2] <= 80  # documents of about 65 tokens, as the target says
    assert share >= least, share


def test_far_past_capacity_a_stable_share_stays_warm_where_lru_keeps_none(default_cache):
    count = 160
    shares = {}
    for policy in ("next-use", "lru"):
        engine = default_cache(policy)
        shares[policy], sizes = typed_in_turn(engine, count, rounds=2)
    fit = 4096 // (16 * -(-max(sizes) // 16 + 1))  # documents that fit, each in whole blocks with its suggestion
    assert shares["next-use"] >= 0.5 * fit / count, shares
    assert shares["lru"] < 0.05, shares


def test_suggestions_share_their_prompts_blocks(make_engine):
    """Three suggestions of a long prompt hold its blocks once: the cache holds about one prompt,
    not three, and the answers equal those of a fresh engine."""
    engine = make_engine(config=EngineConfig(max_wait_s=None))
    text = long_document(150)
    prompt = prompt_of(engine, text, 8).tokens
    done = engine.complete(CompletionRequest(text, n=3, greedy=True, max_new_tokens=8))
    used = engine.stats()["kv_tokens_used"]
    assert len(prompt) + 8 <= used <= len(prompt) + 2 * 16 + 8  # the prompt once (and its suggestion)
    fresh = make_engine(slots=4).complete(CompletionRequest(text, n=3, greedy=True, max_new_tokens=8))
    assert ids(done.suggestions) == ids(fresh.suggestions)


def test_documents_that_begin_alike_share_their_common_blocks(make_engine):
    engine = make_engine(config=EngineConfig(max_wait_s=None))
    common = long_document(80)
    tails = (" The end came quickly after that, and nobody in the town spoke of it again for years",
             " A new start was what the baker wanted, so he sold the shop and moved to the coast")
    first = engine.complete(CompletionRequest(common + tails[0], n=1, greedy=True, max_new_tokens=4))
    used = engine.stats()["kv_tokens_used"]
    second = engine.complete(CompletionRequest(common + tails[1], n=1, greedy=True, max_new_tokens=4))
    shared = len(prompt_of(engine, common).tokens) - 2
    assert second.timings.tokens_reused >= shared - 1  # the common part came from the first document
    assert engine.stats()["kv_tokens_used"] - used <= 4 * 16  # and its full blocks are held once
    assert engine.stats()["kv_documents"] == 2
    fresh = make_engine(slots=4).complete(CompletionRequest(common + tails[1], n=1, greedy=True, max_new_tokens=4))
    assert ids(second.suggestions) == ids(fresh.suggestions) and first.suggestions


def test_a_request_larger_than_the_cache_is_refused_with_a_clear_message(make_engine):
    engine = make_engine(config=EngineConfig(kv_tokens=64, rows=4, max_wait_s=None))
    with pytest.raises(BadRequest, match="KV-cache positions"):
        engine.complete(CompletionRequest(long_document(200), n=3, max_new_tokens=8))
    done = engine.complete(CompletionRequest("Hello there", n=1, max_new_tokens=4))  # and it still serves
    assert done.suggestions is not None and not engine.scheduler.pool.busy()


def test_a_cache_too_small_for_all_writers_still_answers_every_request_right(make_engine):
    """Eviction under pressure, with several requests in flight: every answer equals a fresh engine's."""
    small = make_engine(config=EngineConfig(kv_tokens=512, rows=6, max_wait_s=None))
    fresh = make_engine(slots=8)
    texts = documents(12)
    handles = [small.submit(CompletionRequest(t, n=2, greedy=True, max_new_tokens=5)) for t in texts]
    for text, handle in zip(texts, handles):
        got, _ = handle.result(timeout=60)
        want = fresh.complete(CompletionRequest(text, n=2, greedy=True, max_new_tokens=5)).suggestions
        assert ids(got) == ids(want)
    assert small.stats()["evictions"] > 0 and not small.scheduler.pool.busy()
