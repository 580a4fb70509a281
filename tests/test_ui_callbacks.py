"""The page's callbacks, called directly: on a real LocalBackend with the tiny models, and on a
scripted backend for the failures a person must see as a message (never a traceback)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import gradio as gr
import pytest

from app.web import callbacks, render
from app.backends.local import LocalBackend
from model_support import fresh_engine_texts
from app.backends.documents import FileDocumentStore
from model.errors import BackendUnavailable, BadRequest, UnknownModel, WWTError
from model.types import Answer, Scores, ScoreRequest, TokenScore
from ui_support import ROOT, ScriptedBackend

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@pytest.fixture(scope="module")
def backend(tiny_gpt2, tiny_gpt2_heads, tmp_path_factory):
    b = LocalBackend([f"tiny={tiny_gpt2}", f"heads={tiny_gpt2_heads}"], slots=8,
                     documents=FileDocumentStore(tmp_path_factory.mktemp("docs")))
    yield b
    b.close()


def settings(**kw):
    return {"model": "tiny", "n": 3, "max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "top_p": 0.9, **kw}


class Warnings(list):
    def __call__(self, message):
        self.append(message)


# -- Write tab ---------------------------------------------------------------------------------

def test_suggest_gives_continuations_with_model_and_latency(backend, tiny_gpt2):
    r = callbacks.suggest(backend, settings(before="Once upon a time there was", seed=21))
    assert r["ok"], r
    assert r["model"] == "tiny" and r["ms"] > 0
    texts = [s["text"] for s in r["suggestions"]]
    assert texts == fresh_engine_texts(tiny_gpt2, "Once upon a time there was", n=3, max_new_tokens=6, seed=21)
    assert r["asked"] == 3 and r["info"].startswith("tiny · ")
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)
    assert "tiny" in r["info"] and "ms" in r["info"]


def test_suggest_on_an_empty_document(backend):
    r = callbacks.suggest(backend, settings(before=""))
    assert r["ok"], r
    assert r["suggestions"]


def test_control_characters_are_dropped_from_context_and_suggestions(backend):
    r = callbacks.suggest(backend, settings(before="Hello\x00 wor\x07ld\x1b and"))
    assert r["ok"], r
    assert not any(CONTROL.search(s["text"]) for s in r["suggestions"])
    fake = ScriptedBackend(suggestions=["ab"])
    callbacks.suggest(fake, {"before": "x\x01y", "model": "m1"})
    assert fake.requests[0].text == "xy"  # the context is cleaned before it reaches any backend


def test_a_megabyte_of_text_is_refused_with_a_message(backend):
    r = callbacks.suggest(backend, settings(before="word " * 220_000))
    assert r == {"ok": False, "error": "the text has 1,100,000 characters; the limit is 1,000,000"}


def test_long_document_within_the_limit_still_gets_suggestions(backend):
    r = callbacks.suggest(backend, settings(before="The cat sat on the mat. " * 2000, n=1))
    assert r["ok"], r


def test_unknown_model_is_a_message(backend):
    r = callbacks.suggest(backend, settings(model="gpt9", before="Hi"))
    assert not r["ok"]
    assert "unknown model 'gpt9'" in r["error"] and "tiny, heads" in r["error"]


@pytest.mark.parametrize("name,value", [
    ("n", 0), ("n", 10), ("n", 2.5), ("max_new_tokens", 0), ("max_new_tokens", 10_000), ("temperature", -1),
    ("temperature", 9), ("n", "2"), ("n", True), ("top_k", -1), ("top_p", 0), ("top_p", 1.5), ("n", "lots"), ("temperature", "nan"),
])
def test_out_of_range_settings_are_messages(backend, name, value):
    r = callbacks.suggest(backend, settings(before="Hello", **{name: value}))
    assert not r["ok"]
    assert r["error"].startswith(f"{name} must be") and repr(value) in r["error"]


def test_settings_reach_the_request_and_temperature_zero_means_greedy():
    fake = ScriptedBackend()
    callbacks.suggest(fake, {"before": "Hi", "model": "m2", "n": 2, "max_new_tokens": 5, "temperature": 0,
                             "top_k": 40, "top_p": 0.5, "fresh": True})
    req = fake.requests[0]
    assert (req.model, req.n, req.max_new_tokens, req.greedy, req.top_k, req.top_p, req.fresh) == \
        ("m2", 2, 5, True, 40, 0.5, True)
    callbacks.suggest(fake, {"before": "Hi"})
    req = fake.requests[1]
    assert (req.model, req.n, req.greedy, req.fresh, req.stop) == ("m1", 3, False, False, "auto")


def test_backend_down_is_a_message_not_a_traceback():
    fake = ScriptedBackend(error=BackendUnavailable("cannot reach Redis at 127.0.0.1:1"))
    assert callbacks.suggest(fake, {"before": "Hi"}) == {"ok": False, "error": "cannot reach Redis at 127.0.0.1:1"}
    warns = Warnings()
    html = callbacks.token_view(fake, "Hello", "m1", warns)
    assert warns == ["cannot reach Redis at 127.0.0.1:1"] and "cannot reach Redis" in html
    assert "cannot reach Redis" in callbacks.model_status(fake, "m1")


def test_a_bug_in_the_backend_is_reported_plainly(caplog):
    fake = ScriptedBackend()
    warns = Warnings()
    labels, info = callbacks.classify(fake, "some text", "", "m1", warns)
    assert labels is None
    assert len(warns) == 1 and re.fullmatch(
        r"internal error \(NotImplementedError\); the app is still running, try again \(ref [0-9a-f]{8}\)", warns[0])
    assert "Traceback" not in info and "internal error" in info
    assert "Traceback" in caplog.text  # the operator still gets the traceback in the log


def test_malformed_suggest_payload_is_a_message():
    assert callbacks.suggest(ScriptedBackend(), None)["ok"] is True  # defaults: empty text, first model
    r = callbacks.suggest(ScriptedBackend(), {"before": 42})
    assert r == {"ok": False, "error": "the text must be text"}


def test_share_and_reopen(backend):
    doc_id, key = backend.save_document("A shared draft\nwith two lines.")
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", doc_id) and key != doc_id
    assert callbacks.open_shared(backend, doc_id) == "A shared draft\nwith two lines."
    warns = Warnings()
    assert callbacks.open_shared(backend, "../../etc/passwd", warns) is None
    assert warns == ["that is not a valid document link"]
    assert callbacks.open_shared(backend, "A" * 22, warns) is None and "no shared document" in warns[-1]
    assert callbacks.open_shared(backend, None, warns) is None


def test_only_the_delete_key_deletes(backend):
    from model.errors import Forbidden, NotFound

    doc_id, key = backend.save_document("short-lived", client="127.0.0.1")
    with pytest.raises(Forbidden):
        backend.delete_document(doc_id, None)  # the link alone reads
    assert callbacks.open_shared(backend, doc_id) == "short-lived"
    backend.delete_document(doc_id, key)
    assert callbacks.open_shared(backend, doc_id) is None
    with pytest.raises(NotFound):
        backend.delete_document(doc_id, key)


def test_token_view_colours_every_token_and_escapes_html(backend):
    html = callbacks.token_view(backend, "<b>bold</b> & more", "tiny")
    assert "<b>" not in html and "&lt;" in html and "&gt;" in html and "&amp;" in html
    scores = backend.score(ScoreRequest(text="<b>bold</b> & more", model="tiny"))
    assert html.count('class="wwt-tok"') == len(scores.tokens)
    assert "tiny" in html and "ms" in html
    warns = Warnings()
    assert "the document is empty" in callbacks.token_view(backend, "", "tiny", warns) and warns


def test_model_status_and_loading_on_first_use(backend):
    assert "loads on first use" in callbacks.model_status(backend, "heads") or "loaded" in \
        callbacks.model_status(backend, "heads")
    html = callbacks.load_model(backend, "heads")
    assert "heads" in html and "loaded on cpu" in html and "parameters" in html
    assert "heads" in backend.loaded()
    assert "unknown model" in callbacks.load_model(backend, "nope")


# -- Classify, Question answering, Compare --------------------------------------------------

def test_classify_with_the_head_and_zero_shot(backend):
    labels, info = callbacks.classify(backend, "What a lovely day.", "", "heads")
    assert set(labels) == {"NEGATIVE", "POSITIVE"} and abs(sum(labels.values()) - 1) < 1e-4
    assert "heads" in info and "classification head" in info
    labels, info = callbacks.classify(backend, "The striker scored twice.", " sports,politics , ", "tiny")
    assert set(labels) == {"sports", "politics"} and "zero-shot" in info and "tiny" in info


def test_classify_bad_input_is_a_message(backend):
    warns = Warnings()
    assert callbacks.classify(backend, "  ", "", "heads", warns)[0] is None
    labels, info = callbacks.classify(backend, "text", "", "tiny", warns)  # no head, no labels
    assert labels is None and "candidate labels" in info
    assert len(warns) == 2 and warns[0] == "the text is empty"


def test_answer_is_highlighted_in_the_context(backend):
    context = "Alice went to the market with Bob on Sunday."
    view, text, info = callbacks.answer(backend, context, "Who went to the market?", "heads")
    passage = view.split('<div class="wwt-passage">', 1)[1].rsplit("</div>", 1)[0]
    assert re.sub(r"</?mark[^>]*>", "", passage) == context  # one flowing text, nothing added
    assert re.findall(r'<mark class="wwt-answer">(.*?)</mark>', passage) == [text] and text in context
    assert "extracted" in info and "score" in info and "heads" in info


def test_generated_answer_is_marked_generated(backend):
    view, text, info = callbacks.answer(backend, "Alice went to the <market>.", "Who?", "tiny")
    assert "<mark" not in view and "Alice went to the &lt;market&gt;." in view
    assert text.endswith("[generated]") and "generated" in info


def test_answer_needs_a_question_and_a_context(backend):
    warns = Warnings()
    assert callbacks.answer(backend, "ctx", "", "heads", warns)[0] is None
    assert callbacks.answer(backend, "", "q?", "heads", warns)[0] is None
    assert warns == ["the question is empty", "the context is empty"]


def test_compare_sends_one_prompt_to_each_model(backend):
    html = callbacks.compare(backend, "The weather today is", ["tiny", "heads"], 5, 2)
    assert html.count('class="wwt-card"') == 2
    assert "<h3>tiny</h3>" in html and "<h3>heads</h3>" in html
    assert html.count("tokens/s") == 2
    for name in ("tiny", "heads"):
        assert f"{render.human_count(backend.model_info(name)['parameters'])} parameters" in html
    assert "ms" in html
    # the chart: a panel per measure, a bar per model, the likelihood of the prompt included
    panels = re.findall(r'<div class="wwt-chart-panel" data-metric="(\w+)">', html)
    assert panels == ["parameters", "weight_bytes", "ms", "tokens_per_s", "perplexity"]
    assert html.count('<div class="wwt-bar" data-model="tiny"') == 5
    assert html.count('<div class="wwt-bar" data-model="heads"') == 5
    assert html.count("log p -") == 2  # each card: mean log-probability per token of the prompt


def test_one_compare_call_is_one_request_per_offered_model_and_one_place_of_its_client(backend):
    """A model named a thousand times is asked once; the whole Compare holds one place of its
    client's bound, so a client already at its bound is refused and nobody else is held up."""
    import contextlib

    engine = backend.engine("tiny")
    before = engine.scheduler.counters["requests"]
    html = callbacks.compare(backend, "The weather today is", ["tiny"] * 1000, 3, 1, client="203.0.113.5")
    assert html.count('class="wwt-card"') == 1
    assert engine.scheduler.counters["requests"] == before + 1
    warns = Warnings()
    assert "unknown model" in callbacks.compare(backend, "Hi", ["tiny", "gpt9"], 3, 1, warns)
    assert "choose the models" in callbacks.compare(backend, "Hi", ["tiny"] * 100_000, 3, 1, warns)
    bound = backend.clients.bound
    with contextlib.ExitStack() as held:
        for _ in range(bound):
            held.enter_context(backend.one_place("203.0.113.5", "something else"))
        busy = callbacks.compare(backend, "Hi", ["tiny"], 3, 1, warns, client="203.0.113.5")
        assert "busy:" in busy and f"{bound} of your requests" in busy
        assert engine.scheduler.counters["requests"] == before + 1  # nothing was sent
        assert 'class="wwt-card"' in callbacks.compare(backend, "Hi", ["tiny"], 3, 1, client="203.0.113.6")
        result, info = callbacks.classify(backend, "Nice", "good, bad", "tiny", warns, client="203.0.113.5")
        assert result is None and "busy:" in info  # classify, answer and score count by client too
    assert 'class="wwt-card"' in callbacks.compare(backend, "Hi", ["tiny"], 3, 1, client="203.0.113.5")


def test_likelihood_of_a_text():
    scores = Scores(model="m", tokens=[TokenScore("A", 1, 1.0, 0), TokenScore(" b", 2, 0.5, 1),
                                       TokenScore(" c", 3, 0.125, 4)])
    out = callbacks.likelihood(scores)
    assert out["scored_tokens"] == 2  # the first token, predicted by nothing, is left out
    assert abs(out["mean_logprob"] - (math.log(0.5) + math.log(0.125)) / 2) < 1e-12
    assert abs(out["perplexity"] - 4.0) < 1e-9
    assert callbacks.likelihood(Scores(model="m", tokens=[TokenScore("A", 1, 1.0, 0)])) == {}


def test_compare_chart_per_model_and_precision():
    rows = [{"model": "gpt2", "ms": 80.0, "tokens_per_s": 50.0, "parameters": 124_439_808, "precision": "float32",
             "weight_bytes": 497_759_232, "perplexity": 30.0, "mean_logprob": -3.4, "scored_tokens": 9},
            {"model": "gpt2@int8", "ms": 60.0, "tokens_per_s": 70.0, "parameters": 124_439_808, "precision": "int8",
             "weight_bytes": 131_000_000, "perplexity": 30.3, "mean_logprob": -3.41, "scored_tokens": 9},
            {"model": "broken", "error": "no worker is serving broken"}]
    html = render.compare_chart_html(rows)
    assert html.count('data-model="gpt2"') == 5 and html.count('data-model="gpt2@int8"') == 5
    assert 'data-model="broken"' not in html
    assert "gpt2 (float32)" in html and "gpt2@int8 (int8)" not in html  # the name already says it
    weights = html.split('data-metric="weight_bytes"')[1].split('data-metric="ms"')[0]
    assert "width:100.0%" in weights and "width:26.3%" in weights  # bars to scale
    assert "497.8 MB" in weights and "131.0 MB" in weights
    assert render.compare_chart_html([{"model": "x", "error": "down"}]) == ""


def test_suggest_says_how_many_were_asked_for():
    fake = ScriptedBackend(suggestions=["one", "two"])
    r = callbacks.suggest(fake, {"before": "Hi", "model": "m1", "n": 3})
    assert r["ok"] and len(r["suggestions"]) == 2 and r["asked"] == 3  # the page says "2 of 3"


def test_compare_bad_input(backend):
    warns = Warnings()
    assert "choose at least one model" in callbacks.compare(backend, "Hi", [], 5, 1, warns)
    assert "unknown model" in callbacks.compare(backend, "Hi", ["tiny", "nope"], 5, 1, warns)
    assert "the prompt is empty" in callbacks.compare(backend, "", ["tiny"], 5, 1, warns)
    assert len(warns) == 3
    html = callbacks.compare(ScriptedBackend(error=BackendUnavailable("queue down")), "Hi", ["m1"], 5, 1)
    assert "queue down" in html


# -- API functions ---------------------------------------------------------------------------

def test_api_functions_return_plain_dicts(backend, tiny_gpt2):
    c = callbacks.api_complete(backend, "Hello", "tiny", n=2, max_new_tokens=4, seed=3)
    assert c["model"] == "tiny" and "timings" in c
    assert [s["text"] for s in c["suggestions"]] == fresh_engine_texts(tiny_gpt2, "Hello", n=2, max_new_tokens=4, seed=3)
    again = callbacks.api_complete(backend, "Hello", "tiny", n=2, max_new_tokens=4, seed=3)
    assert [s["token_ids"] for s in again["suggestions"]] == [s["token_ids"] for s in c["suggestions"]]  # seeded
    assert callbacks.api_classify(backend, "Nice.", "a, b", "tiny")["method"] == "zero-shot"
    assert callbacks.api_classify(backend, "Nice.", ["a", "b"], "tiny")["method"] == "zero-shot"
    a = callbacks.api_answer(backend, "Who?", "Alice met Bob.", "heads")
    assert "Alice met Bob."[a["start"]:a["end"]] == a["text"]
    s = callbacks.api_score(backend, "Hello world", "tiny")
    assert s["tokens"] and {"text", "prob", "rank", "token_id"} <= set(s["tokens"][0])


@pytest.mark.parametrize("call,kind", [
    (lambda b: callbacks.api_complete(b, "Hi", "nope"), UnknownModel),
    (lambda b: callbacks.api_complete(b, "Hi", "tiny", n=50), BadRequest),
    (lambda b: callbacks.api_complete(b, "Hi", "tiny", seed=-2), BadRequest),
    (lambda b: callbacks.api_classify(b, "", "", "heads"), BadRequest),
    (lambda b: callbacks.api_answer(b, "", "ctx", "heads"), BadRequest),
    (lambda b: callbacks.api_score(b, "x" * 1_000_001, "tiny"), BadRequest),
])
def test_api_functions_raise_readable_errors(backend, call, kind):
    with pytest.raises(kind) as info:
        call(backend)
    assert isinstance(info.value, WWTError) and info.value.message


# -- the page and the server -------------------------------------------------------------------

def test_the_page_has_the_named_endpoints_and_the_editor(backend):
    from app.web.ui import build_ui

    demo = build_ui(backend)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"complete", "classify", "answer", "score"} <= names
    editor = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "wwt-editor")
    assert {fn.__name__ for fn in editor.server_fns} == {"suggest"}  # sharing is the HTTP API (shared_docs.py)
    assert editor.props["settings"]["model"] == "tiny"


def test_render_helpers():
    assert render.human_count(124_439_808) == "124M" and render.human_count(1_557_611_200) == "1.6B"
    assert render.human_count(None) == "?"
    hues = [int(render.prob_colour(p).split("(")[1].split(",")[0]) for p in (1e-9, 1e-4, 0.1, 1.0)]
    assert hues == sorted(hues) and hues[0] == 0 and hues[-1] == 130
    ans = Answer(model="m", text="Bob", score=0.5, start=15, end=18)
    assert render.answer_spans("Alice met with Bob.", ans) == \
        [("Alice met with ", None), ("Bob", "answer"), (".", None)]
    assert '<div class="wwt-passage">Alice met with <mark class="wwt-answer">Bob</mark>.</div>' in \
        render.answer_html("Alice met with Bob.", ans)
    html = render.token_view_html(Scores(model="m", tokens=[TokenScore("a\n", 1, 0.5, 2), TokenScore("<", 2, 1, 0)]))
    assert "a↵\n" in html and "&lt;" in html and "first token" in html


def test_the_page_refreshes_the_model_status(backend):
    from app.web.ui import STATUS_REFRESH_S, build_ui

    demo = build_ui(backend)
    status = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "wwt-model-status")
    timers = [b for b in demo.blocks.values() if isinstance(b, gr.Timer)]
    assert len(timers) == 1 and timers[0].value == STATUS_REFRESH_S <= 10
    ticks = [fn for fn in demo.fns.values() if any(t[0] == timers[0]._id and t[1] == "tick" for t in fn.targets)]
    assert len(ticks) == 1 and [b._id for b in ticks[0].outputs] == [status._id]
    assert ticks[0].show_progress == "hidden"


def test_serve_without_weights_fails_at_once_with_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "GRADIO_ANALYTICS_ENABLED": "False",
           "WWT_MODELS": "gpt2"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not in the local cache" in proc.stderr
    assert "--model" in proc.stderr and "wwt make-tiny-model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_suggest_passes_the_editor_id_so_a_newer_request_cancels_the_older():
    fake = ScriptedBackend(suggestions=["one", "two"])
    callbacks.suggest(fake, {"before": "Hello", "model": "m1", "client": "editor-7"})
    callbacks.suggest(fake, {"before": "Hello", "model": "m1"})
    callbacks.suggest(fake, {"before": "Hello", "model": "m1", "client": 42})  # not an id: ignored
    assert fake.supersede_keys == ["editor-7", None, None]


def test_a_busy_refusal_reaches_the_editor_and_the_api_as_a_readable_message(tiny_gpt2):
    import threading
    import time

    from model.errors import Busy
    from model.types import CompletionRequest
    from model_support import slow_down

    b = LocalBackend([f"tiny={tiny_gpt2}"], slots=4)
    try:
        engine = b.engine("tiny")
        slow_down(engine, 0.005)
        engine.scheduler.max_waiting, engine.scheduler.max_waiting_per_client = 1, 1
        running = engine.submit(CompletionRequest("Once upon a time " * 4, n=4, greedy=True, max_new_tokens=100,
                                                  stop=None))
        deadline = time.monotonic() + 30
        while len(engine.scheduler.pool.busy()) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        waiting = engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4))
        busy = "busy: 1 request is waiting for tiny; try again in a moment"
        assert callbacks.suggest(b, settings(before="Once upon"), client="10.0.0.9") == {"ok": False, "error": busy}
        with pytest.raises(Busy, match="^busy: 1 request is waiting for tiny"):
            callbacks.api_complete(b, "Once upon", "tiny")
        waiting.cancel()
        engine.scheduler.max_waiting = None
        # One editor typing fast: each newer keystroke cancels its older one first, so the
        # per-client bound (1 here) never refuses the editor's own latest request.
        answers = {}

        def keystroke(i):
            answers[i] = callbacks.suggest(b, settings(before=f"Once upon {i}", client="editor-1"), client="10.0.0.9")

        first = threading.Thread(target=keystroke, args=(1,))
        first.start()
        while engine.scheduler.waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        second = threading.Thread(target=keystroke, args=(2,))
        second.start()
        first.join(30)
        assert answers[1]["ok"] is False and "cancel" in answers[1]["error"]
        running.cancel()
        second.join(30)
        assert answers[2]["ok"], answers[2]
    finally:
        b.close()


def test_the_gradio_queue_is_bounded(backend, monkeypatch):
    from app.app_config import AppConfig
    from app.server import build_app

    monkeypatch.setenv("WWT_QUEUE_MAX_SIZE", "7")  # read once, at the edge, into the configuration
    assert build_app(backend, AppConfig.from_settings())._queue.max_size == 7
    assert build_app(backend, AppConfig(queue_max_size=None))._queue.max_size is None
