"""The pure parts of the engine: prompt building, token healing masks, stop rules, the slot pool."""

from __future__ import annotations

import pytest
import torch

from model.contract import MAX_TEXT_CHARS, clean_text, stable_tail
from model.serving.autocomplete import AUTO_MAX_WORDS, HealingMasks, Prompt, apply_stop, build_prompt, continuation
from model.errors import BadRequest
from model.serving.sampling import SamplingSettings, choose
from model.serving.slots import SlotPool, common_prefix
from model.network.tiny import corpus_lines
from model.network.tokenizer import load_tokenizer_folder


@pytest.fixture(scope="module")
def tok(tiny_gpt2):
    return load_tokenizer_folder(tiny_gpt2)


@pytest.fixture(scope="module")
def openai_tok(tiny_openai):
    return load_tokenizer_folder(tiny_openai)


def long_document(words: int = 3000) -> str:
    text = " ".join(corpus_lines())
    while len(text.split()) < words:
        text = text + " " + text
    return " ".join(text.split()[:words])


# -- clean_text ------------------------------------------------------------------------------
def test_clean_text_replaces_lone_surrogates_and_keeps_the_rest():
    assert clean_text("abc\ud800def") == "abc\ufffddef"
    assert clean_text("\ud800") == "\ufffd"
    assert clean_text("x\udfff") == "x\ufffd"
    assert clean_text("\ud83d\ude00!") == "😀!"  # a pair sent as two code units joins
    for s in ["", " ", "😀 café e\u0301 שלום \t\n", "🏳️‍🌈"]:
        assert clean_text(s) == s


def test_clean_text_drops_control_characters_but_keeps_tabs_and_line_ends():
    assert clean_text("a\x00b\x1bc\x7f\td\r\ne") == "abc\td\r\ne"


@pytest.mark.parametrize("bad", [5, b"bytes", ["a"], True])
def test_clean_text_rejects_non_strings(bad):
    with pytest.raises(BadRequest):
        clean_text(bad)


def test_clean_text_rejects_huge_texts():
    clean_text("a" * MAX_TEXT_CHARS)
    with pytest.raises(BadRequest, match="limit"):
        clean_text("a" * (MAX_TEXT_CHARS + 1))


# -- build_prompt and token healing -----------------------------------------------------------
@pytest.mark.parametrize("text", ["Hel", "Hello wor", "The weather in the val", "x", "😀 café e\u0301",
                                  "שלום", "ends with a space ", "two lines\n"])
def test_build_prompt_backs_up_the_last_token(tok, text):
    p = build_prompt(tok, text, 200, tok.eos_token_id)
    ids = tok.encode(text)
    assert p.heal == tok.token_bytes(ids[-1]) and p.heal
    assert p.dropped_tokens == 0
    if len(ids) > 1:
        assert p.tokens == ids[:-1]
    else:  # nothing left: the prompt starts from end-of-text
        assert p.tokens == [tok.eos_token_id]
    body = p.tokens if p.tokens != [tok.eos_token_id] else []
    assert tok.decode_bytes(body) + p.heal == text.encode("utf-8")


def test_build_prompt_empty_text(tok, openai_tok):
    p = build_prompt(tok, "", 200, tok.eos_token_id)
    assert p.tokens == [tok.eos_token_id] and p.heal == b""
    with pytest.raises(BadRequest, match="empty"):
        build_prompt(openai_tok, "", 200, None)


def test_build_prompt_without_byte_level_does_not_heal(openai_tok):
    p = build_prompt(openai_tok, "Hello there, how are", 200, None)
    assert p.heal == b""
    assert p.tokens == openai_tok.encode("Hello there, how are")
    assert p.text_prefix == openai_tok.decode(p.tokens)


def test_build_prompt_fits_the_budget_and_cuts_whole_strides(tok):
    budget = 120
    text = long_document(2000)
    p = build_prompt(tok, text, budget, tok.eos_token_id)
    assert 0 < len(p.tokens) <= budget
    assert p.dropped_tokens > 0 and p.dropped_tokens % (budget // 4) == 0
    # What is kept is the end of the document.
    assert text.encode("utf-8").endswith(tok.decode_bytes(p.tokens) + p.heal)


def test_stable_tail_keeps_the_start_while_typing():
    text = long_document(1500)
    assert stable_tail("short", 100) == "short"
    max_chars = 1000
    starts = []
    typed = text
    for ch in "and then the rest of the story went on":
        typed += ch
        tail = stable_tail(typed, max_chars)
        assert typed.endswith(tail) and len(tail) <= max_chars
        starts.append(len(typed) - len(tail))
    # A cut that moves at every keystroke would defeat the prefix cache.
    assert len(set(starts)) <= 2


def test_consecutive_keystrokes_keep_the_prompt_start(tok):
    """Typing one character at a time on a long document keeps almost every prompt's prefix."""
    budget = 120
    text = long_document(2000)
    previous = None
    moved = 0
    keystrokes = 0
    for ch in " and the snow kept falling on the quiet village all night long":
        text += ch
        p = build_prompt(tok, text, budget, tok.eos_token_id)
        assert len(p.tokens) <= budget
        if previous is not None:
            keystrokes += 1
            if common_prefix(previous, p.tokens) < len(previous) - 3:
                moved += 1
        previous = p.tokens
    # The start moves once every `budget // 4` tokens, i.e. rarely when typing ~60 characters.
    assert moved <= 2, f"{moved} of {keystrokes} keystrokes lost the cached prefix"


# -- healing masks ------------------------------------------------------------------------------
@pytest.mark.parametrize("pending", [b"el", b"or", b"H", b" w", b"\x81", b"\xbd", b"\xc3\xa9", b" the"])
def test_healing_mask_allows_exactly_the_tokens_that_spell_the_typed_bytes(tok, pending):
    table = tok.all_token_bytes()
    masks = HealingMasks(tok, len(table) + 8)  # a model may pad its vocabulary
    mask = masks.mask(pending)
    assert mask.dtype == torch.bool and mask.shape[0] == len(table) + 8
    assert not mask[len(table):].any()
    for i, b in enumerate(table):
        expected = bool(b) and (b.startswith(pending) or pending.startswith(b))
        assert bool(mask[i]) == expected, (i, b, pending)
    assert mask.any()
    assert not mask[tok.eos_token_id]  # end-of-text spells nothing


# -- continuation -------------------------------------------------------------------------------
def test_continuation_strips_the_healed_bytes_and_half_characters(tok):
    prompt = build_prompt(tok, "Hel", 200, tok.eos_token_id)
    gen = tok.encode("el") + tok.encode("lo there")  # "el" spelled again, then the rest
    assert tok.decode_bytes(gen).startswith(prompt.heal)
    assert continuation(tok, prompt, gen) == "lo there"
    # A trailing half of a UTF-8 character is left out until it is complete.
    emoji = tok.encode("el😀")
    assert continuation(tok, prompt, emoji) == "😀"
    assert continuation(tok, prompt, emoji[:-1]) == ""


def test_continuation_without_byte_level(openai_tok):
    ids = openai_tok.encode("hello there")
    prompt = Prompt(ids, b"", openai_tok.decode(ids))
    more = openai_tok.encode("hello there friend")[len(ids):]
    assert continuation(openai_tok, prompt, more).strip() == "friend"


# -- stop rules ---------------------------------------------------------------------------------
def test_apply_stop_none_never_cuts():
    text = "One line.\nAnother line. " + "word " * 40
    assert apply_stop(text, None) == (text, False)
    assert apply_stop("", "auto") == ("", False)


def test_apply_stop_auto_newline():
    assert apply_stop(" the end of it\nnext line", "auto") == (" the end of it", True)
    # Leading newlines are part of the suggestion (start a new paragraph, then go on).
    assert apply_stop("\n\nNew paragraph here\nmore", "auto") == ("\n\nNew paragraph here", True)


def test_apply_stop_auto_sentence_end():
    assert apply_stop(" is cold. Snow fell", "auto") == (" is cold.", True)
    assert apply_stop(" you today? I hope", "auto") == (" you today?", True)
    assert apply_stop(' she said." Then', "auto") == (' she said."', True)
    # A decimal point is not the end of a sentence.
    assert apply_stop(" costs 5.99 dollars", "auto") == (" costs 5.99 dollars", False)
    # A sentence that has not ended yet is not cut.
    assert apply_stop(" still going on and", "auto") == (" still going on and", False)


def test_apply_stop_auto_word_budget():
    words = " " + " ".join(f"w{i}" for i in range(AUTO_MAX_WORDS + 5))
    text, stopped = apply_stop(words, "auto")
    assert stopped and len(text.split()) == AUTO_MAX_WORDS and words.startswith(text)
    short = " " + " ".join(f"w{i}" for i in range(AUTO_MAX_WORDS - 1))
    assert apply_stop(short, "auto") == (short, False)


def test_apply_stop_list_cuts_at_the_first_stop():
    assert apply_stop("abc, def; ghi", [";", ","]) == ("abc", True)
    assert apply_stop("abc def", ["x", "yz"]) == ("abc def", False)
    assert apply_stop("abc\ndef", ["\n"]) == ("abc", True)
    assert apply_stop("abc", []) == ("abc", False)
    assert apply_stop("abc", [""]) == ("abc", False)  # an empty stop string is ignored


# -- greedy ranks --------------------------------------------------------------------------------
def test_greedy_rank_never_picks_a_masked_token():
    logits = torch.full((10,), float("-inf"))
    logits[3], logits[7] = 2.0, 1.0
    s = SamplingSettings(greedy=True)
    assert [choose(logits, s, None, rank=r) for r in range(4)] == [3, 7, 7, 7]


# -- the slot pool -------------------------------------------------------------------------------
def test_common_prefix():
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [6]) == 0


def _filled(pool: SlotPool, docs: list) -> SlotPool:
    for i, doc in enumerate(docs):
        pool.wrote(i, doc)
    return pool


def test_pool_prefers_the_longest_shared_prefix():
    pool = _filled(SlotPool(4), [[1, 2, 3], [1, 2, 3, 4, 5, 6], [9, 9], []])
    slots, reuse = pool.acquire([1, 2, 3, 4, 5, 7], 1)
    assert slots == [1] and reuse == 5
    assert pool.held(1) == [1, 2, 3, 4, 5]  # what is past the shared prefix is stale
    assert pool.busy() == [1]


def test_pool_always_leaves_one_token_to_prefill():
    pool = _filled(SlotPool(2), [[1, 2, 3, 4]])
    slots, reuse = pool.acquire([1, 2, 3], 1)
    assert slots == [0] and reuse == 2  # the last prompt token gives the next-token logits


def _typed(pool: SlotPool, doc: list) -> int:
    """One request for `doc` on a pool with no empty slot left to give: (the slot it got)."""
    slots, _ = pool.acquire(doc, 1)
    pool.wrote(slots[0], doc)
    pool.release(slots)
    return slots[0]


@pytest.mark.parametrize("policy", ["lru", "next-use"])
def test_pool_past_capacity_lru_keeps_nothing_and_next_use_a_stable_set(policy):
    """Five documents typed in turn over four slots. Least recently used evicts each document just
    before its turn: no keystroke finds its document. Next-use keeps the documents that were held
    (at least three of five keystrokes after the first rounds find theirs)."""
    pool = SlotPool(4, eviction=policy)
    docs = [[10 * d + 1, 10 * d + 2] for d in range(5)]
    hits = 0
    for r in range(6):
        for d in range(5):
            docs[d] = docs[d] + [100 + r]
            slots = pool.choose(docs[d], 1)[0]
            hit = pool.held(slots[0])[:2] == docs[d][:2]
            hits += hit and r >= 2
            _typed(pool, docs[d])
    if policy == "lru":
        assert hits == 0
    else:
        assert hits >= 4 * 3  # at least three of the five documents, every round from the third on


def test_pool_next_use_keeps_a_busy_writer_among_idle_documents():
    """One writer types every other request; documents typed once come in between. The writer's
    document is never evicted (its pace is known and short), the newest one-off is."""
    pool = SlotPool(3)
    writer = [1, 2]
    for i in range(12):
        writer = writer + [50 + i]
        slots, reused = pool.acquire(writer, 1)
        assert i < 1 or reused == len(writer) - 1, i  # its document is held: only the new token is prefilled
        pool.wrote(slots[0], writer)
        pool.release(slots)
        _typed(pool, [200 + i, 7, 7])  # a document typed once


def test_pool_keeps_documents_that_share_only_their_first_tokens():
    """A slot holding another document that shares a first word is not taken while an empty one is free."""
    pool = SlotPool(4)
    docs = [[7, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11], [7, 1, 2, 30, 31, 32, 33, 34]]
    for doc in docs:
        slots, reuse = pool.acquire(doc, 1)
        assert reuse == 0
        pool.wrote(slots[0], doc)
        pool.release(slots)
    assert sorted(tuple(pool.held(i)) for i in range(3)) == sorted(map(tuple, docs))
    for doc in docs:  # the next keystroke of each finds its own slot whole
        slots, reuse = pool.acquire(doc + [99], 1)
        assert reuse == len(doc) and pool.held(slots[0]) == doc
        pool.wrote(slots[0], doc + [99])
        pool.release(slots)


def test_pool_copies_of_a_prompt_are_emptied_and_the_document_kept():
    pool = SlotPool(4)
    slots, _ = pool.acquire([5, 6, 7], 3)  # three suggestions: three copies of one prompt
    for s in slots:
        pool.wrote(s, [5, 6, 7, 40 + s])
    pool.release(slots, keep=slots[0])
    assert [pool.held(s) for s in slots[1:]] == [[], []] and pool.documents() == 1
    other, reuse = pool.acquire([9, 9, 9], 3)  # needs three: the empty slots, not the document
    assert slots[0] not in other and reuse == 0
    for s in other:
        pool.wrote(s, [9, 9, 9])
    pool.release(other, keep=other[0])
    again, reuse = pool.acquire([5, 6, 7, 8], 1)
    assert again == [slots[0]] and reuse == 3  # the kept copy still holds the first document


def test_pool_edit_near_the_end_reuses_the_same_document():
    pool = _filled(SlotPool(2), [[1, 2, 3, 4, 5, 6, 7, 8]])
    slots, reuse = pool.acquire([1, 2, 3, 4, 5, 6, 9], 1)  # an edit two tokens from the end
    assert slots == [0] and reuse == 6


def test_pool_waits_when_not_enough_slots_are_free():
    pool = SlotPool(3)
    first, _ = pool.acquire([1, 2], 2)
    assert len(first) == 2 and len(set(first)) == 2
    assert pool.acquire([3, 4], 2) is None
    assert len(pool.busy()) == 2  # a failed acquire reserves nothing
    one, _ = pool.acquire([3, 4], 1)
    assert one[0] not in first
    pool.release(first)
    again, _ = pool.acquire([5, 6], 2)
    assert set(again) == set(first)
    assert pool.free() == []
