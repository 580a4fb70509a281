"""The named endpoints as MCP tools, through the `mcp` package's own client (streamable HTTP), in
both modes; and the identity an MCP tool call runs under."""

from __future__ import annotations

import asyncio

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from app.app_config import AppConfig
from app.backends import make_backend

from ui_support import app_in_mode, launch_in_process

TOOLS = {"complete", "classify", "answer", "score"}


@pytest.fixture(scope="module", params=["local", "celery"])
def mcp_url(request, tiny_gpt2_heads, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"mcp-{request.param}")
    with app_in_mode(request.param, f"tiny={tiny_gpt2_heads}", folder) as (url, _):
        yield url + "gradio_api/mcp/"


def session_run(url: str, work):
    """Run `work(session)` in an initialised MCP client session; its result."""
    async def main():
        async with streamable_http_client(url) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    return asyncio.run(main())


def test_the_tools_are_listed_with_descriptions_and_parameter_docs(mcp_url):
    async def work(session):
        return (await session.list_tools()).tools

    tools = {t.name: t for t in session_run(mcp_url, work)}
    assert TOOLS <= set(tools)
    for name in TOOLS:
        tool = tools[name]
        assert len(tool.description) > 30, name
        props = tool.inputSchema["properties"]
        assert all(p.get("description") for p in props.values()), (name, props)
    assert "comma-separated" in tools["classify"].inputSchema["properties"]["labels"]["description"]


def test_each_tool_is_called(mcp_url):
    async def work(session):
        out = {}
        calls = {"complete": {"text": "Once upon a time", "n": 2, "max_new_tokens": 4, "seed": 1},
                 "classify": {"text": "What a lovely day"},
                 "answer": {"question": "Who wrote it?", "context": "The letter was written by Ada in 1843."},
                 "score": {"text": "Hello world"}}
        for name, args in calls.items():
            result = await session.call_tool(name, args)
            assert not result.isError, (name, result.content)
            out[name] = result.content[0].text
        return out

    out = session_run(mcp_url, work)
    assert "suggestions" in out["complete"] and "Hell" in out["score"] and "rank" in out["score"]
    assert "POSITIVE" in out["classify"] or "LABEL_" in out["classify"]
    assert "start" in out["answer"] and "score" in out["answer"]


def test_bad_input_through_mcp_is_a_clear_error(mcp_url):
    async def work(session):
        empty = await session.call_tool("score", {"text": ""})
        unknown = await session.call_tool("complete", {"text": "Hi", "model": "nope"})
        too_many = await session.call_tool("complete", {"text": "Hi", "n": 99})
        fine = await session.call_tool("score", {"text": "Still here"})
        return empty, unknown, too_many, fine

    empty, unknown, too_many, fine = session_run(mcp_url, work)
    assert empty.isError and "empty" in empty.content[0].text
    assert unknown.isError and "nope" in unknown.content[0].text
    assert too_many.isError and "n must be" in too_many.content[0].text
    assert not fine.isError


def test_a_tool_call_counts_for_its_caller_and_headers_cannot_be_forged():
    """The loopback call of Gradio's MCP server carries the caller's identity, vouched for by a
    secret of this process; the same headers from outside are dropped and change nothing."""
    from app.web import client_identity as ci

    seen = {}

    async def app(scope, receive, send):
        seen["client"] = scope["client"][0]
        seen["headers"] = dict(scope["headers"])

    def run(path, peer, headers):
        mw = ci.ClientIdentity(app, ci.TrustedProxies())
        asyncio.run(mw({"type": "http", "path": path, "client": (peer, 1), "headers": headers}, None, None))
        return seen["client"], seen["headers"]

    # a stranger calls the MCP route: it is itself, and the route's request carries the vouched identity
    client, headers = run("/gradio_api/mcp/", "127.0.0.3", [(b"x-wwt-client", b"9.9.9.9"),
                                                             (b"x-wwt-client-proof", b"guess")])
    assert client == "127.0.0.3" and headers[ci.CLIENT_HEADER] == b"127.0.0.3"
    proof = headers[ci.PROOF_HEADER]
    # Gradio's loopback call with those headers: counted for the stranger
    assert run("/gradio_api/queue/join", "127.0.0.1", list(headers.items()))[0] == "127.0.0.3"
    # the same headers from anywhere but loopback, or a wrong proof: ignored, and removed
    client, headers = run("/gradio_api/queue/join", "127.0.0.4",
                          [(ci.CLIENT_HEADER, b"9.9.9.9"), (ci.PROOF_HEADER, proof)])
    assert client == "127.0.0.4" and ci.CLIENT_HEADER not in headers and ci.PROOF_HEADER not in headers
    client, _ = run("/gradio_api/queue/join", "127.0.0.1", [(ci.CLIENT_HEADER, b"9.9.9.9"),
                                                             (ci.PROOF_HEADER, b"0" * len(proof))])
    assert client == "127.0.0.1"


def test_an_mcp_caller_is_counted_as_itself_end_to_end(tiny_gpt2, tmp_path):
    """A stranger on 127.0.0.3 with a forged X-Forwarded-For calls a tool: the backend is asked for
    127.0.0.3 (not the loopback address of Gradio's own call, not the forged one)."""
    import httpx

    config = AppConfig(models=(f"tiny={tiny_gpt2}",), data_dir=str(tmp_path))
    backend = make_backend(config)
    seen = []
    score = backend.score

    def recording(request, timeout=None, client=None):
        seen.append(client)
        return score(request, timeout=timeout, client=client)

    backend.score = recording
    demo, url = launch_in_process(backend, config)

    async def main():
        stranger = httpx.AsyncClient(headers={"X-Forwarded-For": "6.6.6.6"}, timeout=30,
                                     transport=httpx.AsyncHTTPTransport(local_address="127.0.0.3"))
        async with stranger, streamable_http_client(url + "gradio_api/mcp/", http_client=stranger) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await session.call_tool("score", {"text": "Hello"})

    try:
        assert not asyncio.run(main()).isError
    finally:
        demo.close()
        backend.close()
    assert seen == ["127.0.0.3"]
