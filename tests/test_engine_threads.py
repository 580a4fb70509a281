"""Many callers, one model thread: every caller gets its own answer, all model work runs on the
scheduler's thread, and the engines of a process share it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from model.errors import Cancelled
from model.network.tiny import corpus_lines
from model_support import BATCH_TEXTS, STORY, idle, ids, suggest


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
                answers[(t, j)] = ids(suggest(shared, texts[(t, j)], n=2, greedy=True, max_new_tokens=5))
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
        assert answers[key] == ids(suggest(alone, text, n=2, greedy=True, max_new_tokens=5)), text
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
            return ids(suggest(e, text, n=2, greedy=True, max_new_tokens=6))
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
    suggest(engine, STORY, n=2, max_new_tokens=4)
    engine.classify(STORY)
    engine.classify(STORY, labels=["weather", "sport"])
    engine.score(STORY)
    engine.answer("What covered the valley?", STORY)
    assert len(seen) >= 5
    assert set(seen) == {engine.run_on_model_thread(threading.current_thread)}


def test_run_returns_results_and_raises_errors_on_the_model_thread(make_engine):
    engine = make_engine(slots=2)
    assert engine.run_on_model_thread(threading.current_thread) is not threading.current_thread()
    assert engine.scheduler.on_model_thread() is False
    with pytest.raises(ZeroDivisionError):
        engine.run_on_model_thread(lambda: 1 / 0)
    assert engine.run_on_model_thread(lambda: 6 * 7) == 42  # the loop survives a failing call
    assert suggest(engine, "Hello", n=1, greedy=True, max_new_tokens=3)
    engine.close()
    with pytest.raises(Cancelled):
        engine.run_on_model_thread(lambda: 1)


def test_engines_of_a_process_share_one_model_thread(make_engine, tiny_openai):
    """Two models at once (the Compare tab): one thread takes turns; each answers as it would alone;
    one failing or closing leaves the other working."""
    from model.serving.threads import model_thread

    a, b = make_engine(slots=4), make_engine(path=tiny_openai, slots=4)
    thread_a, thread_b = a.run_on_model_thread(threading.current_thread), b.run_on_model_thread(threading.current_thread)
    assert thread_a is thread_b is model_thread(torch.device("cpu")).thread
    assert model_thread(torch.device("cuda")) is not model_thread(torch.device("cpu"))  # GPUs keep their own
    expected = {e: ids(suggest(e, STORY, n=2, greedy=True, max_new_tokens=8, stop=None)) for e in (a, b)}
    results, errors = {}, []

    def caller(engine, i):
        try:
            results[(engine, i)] = ids(suggest(engine, STORY, n=2, greedy=True, max_new_tokens=8, stop=None))
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
        suggest(a, "Something new entirely", n=1, max_new_tokens=3)
    assert ids(suggest(b, STORY, n=2, greedy=True, max_new_tokens=8, stop=None)) == expected[b]
    a.close()
    assert ids(suggest(b, STORY, n=2, greedy=True, max_new_tokens=8, stop=None)) == expected[b]
