"""Single forward passes beside the LM: classification (head and zero-shot), question answering
(QA head or generated), per-token scores; and an openai-gpt checkpoint, which has no healing.
"""

from __future__ import annotations

import pytest
import torch

from model import Engine
from model.errors import BadRequest
from model.types import CompletionRequest
from model_support import DEVICE, STORY, assert_good_suggestions, suggest


def test_classify_with_a_head(heads_engine):
    assert "sequence-classification" in heads_engine.extra_heads
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


def test_openai_gpt_completes_without_healing(tiny_openai):
    engine = Engine.from_pretrained(str(tiny_openai), slots=4, device=DEVICE)
    try:
        done = engine.complete(CompletionRequest("Once upon a time there was a", n=3, seed=5, max_new_tokens=6))
        assert done.healed == ""
        assert_good_suggestions(done.suggestions, 3)
        greedy = engine.complete(CompletionRequest("The weather in the", n=2, greedy=True, max_new_tokens=6))
        assert_good_suggestions(greedy.suggestions, 2)
        again = engine.complete(CompletionRequest("The weather in the valley", n=2, greedy=True,
                                                  max_new_tokens=6))
        assert again.timings.tokens_reused > 0
        with pytest.raises(BadRequest, match="empty"):
            suggest(engine, "", n=1)
        assert not engine.scheduler.pool.busy()
    finally:
        engine.close()
