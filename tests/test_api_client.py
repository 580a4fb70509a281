"""The named endpoints /complete, /classify, /answer and /score, through gradio_client and plain HTTP,
against `wwt serve` with the tiny models."""

from __future__ import annotations

import pytest

from model_support import fresh_engine_texts
from ui_support import call_over_http

gradio_client = pytest.importorskip("gradio_client")


def test_the_named_endpoints_are_listed(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert {"/complete", "/classify", "/answer", "/score"} <= set(api["named_endpoints"])
    params = [p["parameter_name"] for p in api["named_endpoints"]["/complete"]["parameters"]]
    assert params[:3] == ["text", "model", "n"]


def test_complete(client, tiny_gpt2, tiny_gpt2_heads):
    out = client.predict("Once upon a time", seed=5, api_name="/complete")  # every other setting has a default
    expected = fresh_engine_texts(tiny_gpt2, "Once upon a time", n=3, max_new_tokens=8, top_p=0.9, seed=5)
    assert out["model"] == "tiny" and [x["text"] for x in out["suggestions"]] == expected
    s = out["suggestions"][0]
    assert s["text"] and len(s["token_ids"]) == len(s["logprobs"]) >= 1
    assert out["timings"]["total_ms"] > 0
    seeded = [client.predict("Once upon a time", model="heads", n=2, max_new_tokens=4, seed=7, api_name="/complete")
              for _ in range(2)]
    assert seeded[0]["model"] == "heads"
    assert [x["text"] for x in seeded[0]["suggestions"]] == fresh_engine_texts(
        tiny_gpt2_heads, "Once upon a time", n=2, max_new_tokens=4, seed=7)
    assert [x["token_ids"] for x in seeded[0]["suggestions"]] == [x["token_ids"] for x in seeded[1]["suggestions"]]
    assert all(len(x["token_ids"]) <= 4 for x in seeded[0]["suggestions"])


def test_compare_is_a_named_endpoint_that_asks_each_offered_model_once(client):
    out = client.predict("The weather today is", "tiny, heads, tiny, heads", 3, 1, api_name="/compare")
    assert [row["model"] for row in out["rows"]] == ["tiny", "heads"]
    assert all(len(row["suggestions"]) == 1 and row["parameters"] > 0 for row in out["rows"])
    every = client.predict("The weather today is", "", 2, 1, api_name="/compare")
    assert [row["model"] for row in every["rows"]] == ["tiny", "heads"]  # empty: every offered model
    with pytest.raises(Exception, match="unknown model"):
        client.predict("Hi", "tiny,gpt9", 2, 1, api_name="/compare")


def test_classify_answer_score(client):
    head = client.predict("What a lovely day", "", "heads", api_name="/classify")
    assert head["method"] == "head" and {x["label"] for x in head["labels"]} == {"NEGATIVE", "POSITIVE"}
    zero = client.predict("The striker scored", labels="sports, politics", model="tiny", api_name="/classify")
    assert zero["method"] == "zero-shot" and {x["label"] for x in zero["labels"]} == {"sports", "politics"}
    context = "Alice met Bob at the station."
    ans = client.predict("Who met Bob?", context, "heads", api_name="/answer")
    assert ans["generated"] is False and context[ans["start"]:ans["end"]] == ans["text"]
    gen = client.predict("Who met Bob?", context, "tiny", api_name="/answer")
    assert gen["generated"] is True and gen["start"] is None
    scores = client.predict("Hello world", api_name="/score")
    assert scores["model"] == "tiny" and "".join(t["text"] for t in scores["tokens"]) == "Hello world"
    assert all(0 <= t["prob"] <= 1 for t in scores["tokens"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(text="Hi", model="gpt9", api_name="/complete"), "unknown model 'gpt9'; this app offers tiny, heads"),
    (dict(text="Hi", n=99, api_name="/complete"), "n must be a whole number between 1 and 10 (got 99)"),
    (dict(text="Hi", top_p=3.0, api_name="/complete"), "top_p must be a number between 0.05 and 1 (got 3.0)"),
    (dict(text="   ", api_name="/classify"), "the text is empty"),
    (dict(question="Who?", context="", api_name="/answer"), "the context is empty"),
])
def test_bad_requests_get_the_message_and_the_server_stays_up(client, kwargs, message):
    with pytest.raises(Exception) as info:
        client.predict(**kwargs)
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)
    assert client.predict("Still up?", api_name="/score")["tokens"]


def _http(server, endpoint: str, data: list) -> tuple[str, object]:
    return call_over_http(server, endpoint, {"data": data})


def test_plain_http(server):
    event, data = _http(server, "complete", ["Once upon a time", "tiny", 2, 6, 1.0, 0, 0.9, False, None])
    assert event == "complete" and data[0]["model"] == "tiny" and data[0]["suggestions"]
    event, data = _http(server, "classify", ["Nice weather", "sunny, rainy", "tiny"])
    assert event == "complete" and {x["label"] for x in data[0]["labels"]} == {"sunny", "rainy"}
    event, data = _http(server, "complete", ["Hi", "gpt9", 3, 8, 1.0, 0, 0.9, False, None])
    assert event == "error" and "unknown model 'gpt9'" in data["error"]


def test_plain_http_with_fewer_inputs(server, tiny_gpt2):
    """Trailing inputs left out take their defaults; a missing text is a readable error, not {"error": null}."""
    event, data = _http(server, "complete", ["Once upon a time"])
    assert event == "complete" and data[0]["model"] == "tiny" and data[0]["suggestions"]
    event, data = _http(server, "complete", ["Once upon a time", "", 3, 8, 1.0, 0, 0.9, False, 11])
    expected = fresh_engine_texts(tiny_gpt2, "Once upon a time", n=3, max_new_tokens=8, seed=11)
    assert event == "complete" and [x["text"] for x in data[0]["suggestions"]] == expected
    event, data = _http(server, "score", ["Hello world"])
    assert event == "complete" and data[0]["tokens"]
    event, data = _http(server, "complete", [])
    assert event == "error"
    assert data["error"] == ("/complete takes 9 inputs in this order: text, model, n, max_new_tokens, temperature, "
                             "top_k, top_p, fresh, seed; got 0, so text is missing")
    event, data = _http(server, "answer", ["Who?"])
    assert event == "error" and "context is missing" in data["error"]
