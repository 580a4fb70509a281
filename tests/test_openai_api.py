"""The OpenAI-compatible API with the official `openai` client, against the app as `wwt serve` builds
it, in both modes: embedded, and Celery with a real redis-server and a real `wwt worker`."""

from __future__ import annotations

import json
import logging

import openai
import pytest
import torch

from app.app_config import AppConfig
from app.backends import make_backend
from model.serving.engine_config import EngineConfig

from model_support import slow_down, wait_until
from ui_support import app_in_mode, http_call, launch_in_process

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module", params=["local", "celery"])
def served(request, tiny_gpt2_heads, tmp_path_factory):
    """(openai client, base url, backend, mode) for the app serving `tiny` in one mode; `absent` is
    offered too (embedded: a missing folder; distributed: no worker serves it)."""
    folder = tmp_path_factory.mktemp(f"oa-{request.param}")
    unserved = (f"absent={folder / 'missing'}",) if request.param == "local" else ("absent",)
    with app_in_mode(request.param, f"tiny={tiny_gpt2_heads}", folder, unserved) as (url, backend):
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=60)
        yield client, url, backend, request.param


def create(client, **kw):
    return client.completions.create(**{"model": "tiny", "prompt": PROMPT, **kw})


def streamed_texts(client, **kw) -> dict[int, str]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in create(client, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert set(finish) == set(texts)
    return texts


# -- what a client gets ------------------------------------------------------------------------

def test_models_list_names_the_offered_models(served):
    client, _, backend, _ = served
    assert [m.id for m in client.models.list()] == backend.models()
    assert client.models.retrieve("tiny").id == "tiny"
    create(client, max_tokens=1)  # loaded (embedded) or announced (distributed): its precision is known
    assert client.models.retrieve("tiny").model_extra["precision"] == "float32"  # a small model on a CPU
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_plain_call_has_openai_s_shape_and_defaults(served):
    client, *_ = served
    r = create(client, seed=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny" and r.created > 0
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].logprobs is None
    assert r.choices[0].finish_reason in ("length", "stop")
    # max_tokens defaults to 16, as OpenAI's does; no automatic stop at a line or sentence end
    assert r.usage.completion_tokens == 16 or r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_text_is_the_reference_s_greedy_continuation(served, tiny_gpt2_heads):
    """temperature 0: the text the reference's greedy `generate` writes from the same prompt tokens."""
    from transformers import GPT2LMHeadModel

    from model.network.tokenizer import load_tokenizer_folder

    client, *_ = served
    tok = load_tokenizer_folder(tiny_gpt2_heads, "gpt2")
    ids = tok.encode(PROMPT)
    ref = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_heads)).eval()
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    r = create(client, temperature=0, max_tokens=12, logprobs=0)
    assert r.choices[0].text == tok.tokenizer.decode(new)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(new)


def test_n_choices_in_order_repeatable_with_a_seed_and_streamed_alike(served):
    client, *_ = served
    a = create(client, n=3, seed=7, max_tokens=10)
    b = create(client, n=3, seed=7, max_tokens=10)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 30 and a.usage.completion_tokens == b.usage.completion_tokens
    assert streamed_texts(client, n=3, seed=7, max_tokens=10) == {c.index: c.text for c in a.choices}
    # greedy rows are n runs of the same request: all alike (the editor's greedy rows differ on purpose)
    g = create(client, n=2, temperature=0, max_tokens=6)
    assert g.choices[0].text == g.choices[1].text


def test_a_list_of_prompts_gives_n_choices_each_in_order(served):
    client, *_ = served
    prompts = ["The river", "A robot", "Winter"]
    r = create(client, prompt=prompts, n=1, seed=3, max_tokens=5, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for p, c in zip(prompts, r.choices):
        assert c.text.startswith(p)
    alone = [create(client, prompt=p, seed=3, max_tokens=5).choices[0].text for p in prompts]
    assert [c.text[len(p):] for p, c in zip(prompts, r.choices)] == alone


def test_logprobs_tokens_and_offsets_are_true(served):
    client, *_ = served
    r = create(client, max_tokens=10, logprobs=3, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text
    offsets = [len(PROMPT)]
    for piece in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(piece))
    assert lp.text_offset == offsets
    assert all(v <= 0 for v in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        assert abs(max(top.values()) - chosen) < 1e-5  # greedy takes the likeliest token
    # streamed, the same tokens and log-probabilities arrive in pieces
    tokens, values = [], []
    for chunk in create(client, max_tokens=10, logprobs=3, temperature=0, stream=True):
        for ch in chunk.choices:
            if ch.logprobs:
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
    assert tokens == lp.tokens and values == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_echo_with_logprobs_scores_the_prompt(served):
    client, *_ = served
    r = create(client, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert "".join(c.logprobs.tokens) == PROMPT and c.logprobs.text_offset[0] == 0
    assert c.logprobs.token_logprobs[0] is None and all(v <= 0 for v in c.logprobs.token_logprobs[1:])
    assert r.usage.prompt_tokens == len(c.logprobs.tokens) and r.usage.completion_tokens == 0


def test_penalties_change_greedy_text_as_openai_defines_them(served):
    client, *_ = served
    plain = create(client, temperature=0, max_tokens=16, logprobs=0).choices[0]
    repeated = max(plain.logprobs.tokens.count(t) for t in plain.logprobs.tokens)
    assert repeated > 1  # the tiny model repeats itself when greedy
    penalised = create(client, temperature=0, max_tokens=16, logprobs=0, frequency_penalty=2.0,
                       presence_penalty=2.0).choices[0]
    assert penalised.text != plain.text
    assert max(penalised.logprobs.tokens.count(t) for t in penalised.logprobs.tokens) < repeated


def test_stop_strings_are_literal(served):
    client, *_ = served
    whole = create(client, temperature=0, max_tokens=16).choices[0].text
    cut_at = whole[3:6]
    r = create(client, temperature=0, max_tokens=16, stop=[cut_at, "\u2603never"]).choices[0]
    assert r.text == whole[:whole.index(cut_at)] and r.finish_reason == "stop"
    assert streamed_texts(client, temperature=0, max_tokens=16, stop=[cut_at])[0] == r.text


# -- refusals: typed exceptions that name the problem, nothing changed -----------------------------

@pytest.mark.parametrize("kw, error, words", [
    ({"model": "nope"}, openai.NotFoundError, "nope"),
    ({"suffix": "end"}, openai.BadRequestError, "suffix"),
    ({"best_of": 3}, openai.BadRequestError, "best_of"),
    ({"max_tokens": 100000}, openai.BadRequestError, "max_tokens"),
    ({"temperature": 9}, openai.BadRequestError, "temperature"),
    ({"n": 0}, openai.BadRequestError, "n must"),
    ({"logprobs": 9}, openai.BadRequestError, "logprobs"),
    ({"stop": [""]}, openai.BadRequestError, "stop"),
    ({"prompt": [1, 2, 3]}, openai.BadRequestError, "token arrays"),
    ({"prompt": "word " * 400, "max_tokens": 10}, openai.BadRequestError, "maximum context length is 256 tokens"),
    ({"logit_bias": {"50": 5}}, openai.BadRequestError, "logit_bias"),
    ({"extra_body": {"frobnicate": 1}}, openai.BadRequestError, "frobnicate"),
    ({"n": 5}, openai.BadRequestError, "at most 4 in flight"),
    ({"prompt": ["a"] * 17}, openai.BadRequestError, "at most 16"),
])
def test_what_cannot_be_honoured_is_refused_by_name(served, kw, error, words):
    client, *_ = served
    with pytest.raises(error) as e:
        create(client, **kw)
    assert words in e.value.message
    body = e.value.body
    assert set(body) >= {"message", "type", "param", "code"}


def test_chat_completions_points_to_completions(served):
    client, *_ = served
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in e.value.message


def test_a_body_over_the_limit_is_413_in_openai_s_shape(served):
    """A Content-Length over the limit (7 MB) is answered before a byte of the body is sent."""
    import http.client
    import urllib.parse

    _, url, *_ = served
    conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(url).port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(8_000_000))
        conn.endheaders()
        r = conn.getresponse()
        status, body = r.status, json.loads(r.read())
    finally:
        conn.close()
    assert status == 413 and "larger than this app accepts" in body["error"]["message"]
    assert body["error"]["code"] == "request_too_large"


def test_an_offered_model_that_cannot_answer_is_a_server_error(served):
    """Distributed: no worker serves it (503). Embedded: its checkpoint is missing (404, and the
    server's path stays in the operator's log)."""
    client, _, _, mode = served
    with pytest.raises(openai.APIStatusError) as e:
        create(client, model="absent")
    if mode == "celery":
        assert e.value.status_code == 503 and "no worker is serving absent" in e.value.message
    else:
        assert e.value.status_code == 404 and "checkpoint folder is missing" in e.value.message
        assert "/" not in e.value.message.split("missing")[1]  # no path of the server's
    assert create(client, max_tokens=2).choices  # and the other model still answers


def test_bad_calls_leave_the_server_answering(served):
    client, url, *_ = served
    for body in [b"not json", b"[]", b'{"model": "tiny", "prompt": "\\ud800x", "max_tokens": 2}',
                 json.dumps({"model": "tiny", "prompt": "\u202e\u0000\ufffd", "max_tokens": 2}).encode()]:
        status, headers, raw = http_call(url + "v1/completions", "POST", body)
        assert status in (200, 400), raw
        assert "error" in json.loads(raw) or json.loads(raw)["object"] == "text_completion"
    assert create(client, max_tokens=2).choices


# -- the local-only checks: bounds and hanging up --------------------------------------------------

@pytest.fixture
def slow_app(tiny_gpt2, tmp_path):
    """The embedded app on a slowed engine, a per-client bound of 2, and an API key."""
    config = AppConfig(models=(f"tiny={tiny_gpt2}",), data_dir=str(tmp_path), api_key="s3cret",
                       engine=EngineConfig(max_waiting_per_client=2))
    backend = make_backend(config)
    slow_down(backend.engine("tiny"), 0.05)
    demo, url = launch_in_process(backend, config)
    yield openai.OpenAI(base_url=url + "v1", api_key="s3cret", max_retries=0, timeout=60), url, backend
    demo.close()
    backend.close()


def test_the_api_key_guards_v1_only(slow_app):
    client, url, _ = slow_app
    wrong = openai.OpenAI(base_url=url + "v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert "API key" in e.value.message
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert http_call(url + "healthz")[0] == 200  # the page's routes stay public


def test_a_client_over_its_bound_is_429_with_retry_after_whoever_it_says_it_is(slow_app, caplog):
    client, url, backend = slow_app
    caplog.set_level(logging.INFO, logger="app.web.openai_api")
    engine = backend.engine("tiny")
    before = engine.scheduler.counters["tokens_decoded"]
    stream = create(client, n=2, max_tokens=120, temperature=0, stream=True, user="alice")
    next(iter(stream))  # the call holds both of this client's places
    try:
        with pytest.raises(openai.RateLimitError) as e:
            create(client, max_tokens=2, user="bob")  # `user` is recorded, never the identity
        assert e.value.response.headers.get("retry-after") == "1"
        assert "busy" in e.value.message
    finally:
        stream.close()  # hanging up cancels the work at once
    assert wait_until(lambda: not engine.scheduler.planner.running and not engine.scheduler.waiting(), 30)
    assert engine.scheduler.counters["tokens_decoded"] - before < 120  # of the 240 asked: it stopped early
    assert "'alice'" in caplog.text and "'bob'" in caplog.text
    assert create(client, max_tokens=2).choices  # the places were given back


def test_cross_origin_calls_only_from_listed_origins(tiny_gpt2, tmp_path):
    for origins, allowed in (((), False), (("https://editor.example",), True)):
        config = AppConfig(models=(f"tiny={tiny_gpt2}",), data_dir=str(tmp_path), cors_origins=origins)
        backend = make_backend(config)
        demo, url = launch_in_process(backend, config)
        try:
            # a public host (not localhost): Gradio's own CORS would reflect any origin there
            headers = {"Origin": "https://editor.example", "Host": "space.example.org"}
            _, got, _ = http_call(url + "v1/models", headers=headers)
            assert (got.get("access-control-allow-origin") == "https://editor.example") is allowed
            status, got, _ = http_call(url + "v1/completions", "OPTIONS", headers={
                **headers, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert (got.get("access-control-allow-origin") == "https://editor.example") is allowed
            _, got, _ = http_call(url + "v1/models", headers={"Origin": "https://evil.example",
                                                              "Host": "space.example.org"})
            assert "access-control-allow-origin" not in got
        finally:
            demo.close()
            backend.close()


def test_streams_share_the_app_s_stream_bound_and_a_growing_prompt_reuses_its_prefix(tiny_gpt2, tmp_path,
                                                                                     monkeypatch):
    from app.web import stream as stream_route

    monkeypatch.setattr(stream_route, "MAX_STREAMS", 1)
    config = AppConfig(models=(f"tiny={tiny_gpt2}",), data_dir=str(tmp_path))
    backend = make_backend(config)
    engine = backend.engine("tiny")
    demo, url = launch_in_process(backend, config)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=60)
    try:
        document = "The lighthouse keeper wrote in his log every night about the ships and the weather"
        create(client, prompt=document, max_tokens=2)
        reused = engine.scheduler.counters["tokens_reused"]
        create(client, prompt=document + " and the gulls", max_tokens=2)
        assert engine.scheduler.counters["tokens_reused"] - reused >= len(engine.tokenizer.encode(document)) - 2

        slow_down(engine, 0.05)
        held = create(client, max_tokens=100, temperature=0, stream=True)
        next(iter(held))  # the one stream the app may write
        try:
            with pytest.raises(openai.RateLimitError) as e:
                create(client, max_tokens=2, stream=True)
            assert "being streamed" in e.value.message
            status, _, body = http_call(url + "wwt/stream", "POST", {"before": "Hello"})
            assert status == 200 and b'"kind": "busy"' in body  # the editor's route shares the bound
        finally:
            held.close()

        def streams_again():
            try:
                return bool(streamed_texts(client, max_tokens=2))
            except openai.RateLimitError:
                return False  # the hung-up stream is still being wound down

        assert wait_until(streams_again, 30)
    finally:
        demo.close()
        backend.close()


def test_a_streamed_echo_and_usage_add_up_to_the_plain_answer(served):
    client, *_ = served
    plain = create(client, n=2, seed=9, max_tokens=6, echo=True, logprobs=1)
    texts, usage, tokens = {}, None, {}
    for chunk in create(client, n=2, seed=9, max_tokens=6, echo=True, logprobs=1, stream=True,
                        stream_options={"include_usage": True}):
        if getattr(chunk, "usage", None):
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs:
                tokens[c.index] = tokens.get(c.index, []) + c.logprobs.tokens
    assert texts == {c.index: c.text for c in plain.choices}
    assert tokens == {c.index: c.logprobs.tokens for c in plain.choices}
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens
