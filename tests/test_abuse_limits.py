"""Abuse limits and bounded memory (issue 12, points 1 and 4): share rate per client, a bound on
the documents' total size, deletion by whoever holds the link, expired files swept on save, a
request-body limit (413), uploads refused, Gradio's session state bounded.

Unit tests on both document stores (the Redis one against a real redis-server), then real HTTP
against a `wwt serve` subprocess.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid

import pytest

from app.backends.documents import BLOCK, FileDocumentStore, RedisDocumentStore, ShareRateLimiter
from model.errors import BadRequest, Forbidden, LimitReached, NotFound
from ui_support import Server, call_over_http, http_call
from app.bench.processes import RedisServer


def _files(folder):
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


# -- the embedded store ---------------------------------------------------------------------------

def test_file_store_rate_limit_per_client_stores_nothing_when_refused(tmp_path):
    store = FileDocumentStore(tmp_path / "docs", limiter=ShareRateLimiter(limit=2, window_s=600))
    store.save("one", "10.0.0.1")
    store.save("two", "10.0.0.1")
    before = _files(store.folder)
    with pytest.raises(LimitReached) as e:
        store.save("three", "10.0.0.1")
    assert "too many shares from your address: at most 2 every 10 minutes" in e.value.message
    assert "nothing was saved" in e.value.message
    assert _files(store.folder) == before
    store.save("another client is not held back", "10.0.0.2")
    assert len(_files(store.folder)) == 3


def test_file_store_rate_window_slides(tmp_path):
    store = FileDocumentStore(tmp_path / "docs", limiter=ShareRateLimiter(limit=1, window_s=0.3))
    store.save("one", "c")
    with pytest.raises(LimitReached):
        store.save("two", "c")
    time.sleep(0.35)
    store.save("three", "c")


def test_file_store_total_bound_counts_bytes_on_disk(tmp_path):
    store = FileDocumentStore(tmp_path / "docs", max_bytes=3 * BLOCK, limiter=ShareRateLimiter(limit=0))
    saved = [store.save(f"small {i}") for i in range(3)]  # each takes one block
    ids, keys_of = [d for d, _ in saved], dict(saved)
    assert store.total_bytes() == 3 * BLOCK
    with pytest.raises(LimitReached) as e:
        store.save("one too many")
    assert "storage is full; nothing was saved" in e.value.message
    assert len(_files(store.folder)) == 3
    store.delete(ids[0], keys_of[ids[0]])  # deleting makes room again
    assert store.total_bytes() == 2 * BLOCK
    store.save("fits now")
    # a megabyte of non-ASCII text takes about a megabyte (not 6x, as \\u escapes would)
    big = FileDocumentStore(tmp_path / "big", max_bytes=10**8, limiter=ShareRateLimiter(limit=0))
    doc, _ = big.save("é" * 400_000)
    assert (big.folder / f"{doc}.json").stat().st_size < 900_000
    assert big.load(doc) == "é" * 400_000


def test_file_store_reads_by_link_and_deletes_by_key_only(tmp_path):
    store = FileDocumentStore(tmp_path / "docs", limiter=ShareRateLimiter(limit=0))
    doc, key = store.save("to be deleted")
    other, other_key = store.save("another")
    for wrong in (None, "", "nope", other_key, "x" * 1000):
        with pytest.raises(Forbidden, match="only the delete key"):
            store.delete(doc, wrong)
        assert store.load(doc) == "to be deleted"  # nothing deleted
    assert key not in (store.folder / f"{doc}.json").read_text()  # kept hashed only
    store.delete(doc, key)
    with pytest.raises(NotFound, match="no shared document at that link"):
        store.load(doc)
    with pytest.raises(NotFound, match="no shared document"):
        store.delete(doc, key)
    with pytest.raises(BadRequest, match="not a valid document link"):
        store.delete("../../etc/passwd", key)
    assert _files(store.folder) == [f"{other}.json"]


def test_a_document_shared_before_delete_keys_reads_but_cannot_be_deleted(tmp_path):
    store = FileDocumentStore(tmp_path / "docs", limiter=ShareRateLimiter(limit=0))
    store.folder.mkdir(parents=True)
    old = "A" * 22
    (store.folder / f"{old}.json").write_text(json.dumps({"text": "from before", "expires": time.time() + 60}))
    assert store.load(old) == "from before"
    with pytest.raises(Forbidden):
        store.delete(old, "any key at all")
    assert store.load(old) == "from before"


def test_file_store_sweeps_expired_files_on_save(tmp_path):
    store = FileDocumentStore(tmp_path / "docs", ttl_s=3600, max_bytes=4 * BLOCK, limiter=ShareRateLimiter(limit=0))
    old = [store.save(f"old {i}")[0] for i in range(4)]
    past = time.time() - 7200
    for doc in old:
        os.utime(store.folder / f"{doc}.json", (past, past))
    # the store is full of expired documents: a save sweeps them (none is ever read) and fits
    fresh, _ = store.save("fresh")
    assert _files(store.folder) == [f"{fresh}.json"]
    assert store.total_bytes() == BLOCK
    # and on its own schedule: a save after SWEEP_EVERY_S removes expired files even when not full
    for doc in [store.save("a")[0]]:
        os.utime(store.folder / f"{doc}.json", (past, past))
    store._swept_at -= 3600
    store.save("b")
    assert len(_files(store.folder)) == 2


def test_file_store_total_survives_a_restart(tmp_path):
    a = FileDocumentStore(tmp_path / "docs", max_bytes=2 * BLOCK, limiter=ShareRateLimiter(limit=0))
    a.save("one")
    a.save("two")
    b = FileDocumentStore(tmp_path / "docs", max_bytes=2 * BLOCK, limiter=ShareRateLimiter(limit=0))
    with pytest.raises(LimitReached):
        b.save("three")


# -- the distributed store (real Redis) -----------------------------------------------------------

@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("docs-redis")).start()
    yield server.client()
    server.stop()


def test_redis_store_bound_rate_and_delete(redis_client):
    redis_client.flushdb()
    store = RedisDocumentStore(redis_client, max_bytes=25, limit=3, window_s=600)
    a, a_key = store.save("0123456789", "1.2.3.4")
    b, b_key = store.save("0123456789", "1.2.3.4")
    assert store.total_bytes() == 20
    keys = set(redis_client.keys("wwt:doc:*"))
    assert a_key.encode() not in b"".join(redis_client.get(k) or b"" for k in redis_client.keys("wwt:dockey:*"))
    with pytest.raises(LimitReached, match="storage is full"):
        store.save("0123456789", "5.6.7.8")
    assert set(redis_client.keys("wwt:doc:*")) == keys and store.total_bytes() == 20  # nothing stored
    for wrong in (None, "", b_key, "nope"):
        with pytest.raises(Forbidden, match="only the delete key"):
            store.delete(a, wrong)
    assert store.load(a) == "0123456789" and store.total_bytes() == 20  # a link alone deletes nothing
    store.delete(a, a_key)
    with pytest.raises(NotFound, match="no shared document"):
        store.load(a)
    with pytest.raises(NotFound, match="no shared document"):
        store.delete(a, a_key)
    assert store.total_bytes() == 10 and not redis_client.exists(store.key_prefix + a)
    store.save("0123456789", "1.2.3.4")  # the third share of 1.2.3.4
    store.delete(b, b_key)
    with pytest.raises(LimitReached, match="too many shares from your address: at most 3 every 10 minutes"):
        store.save("x", "1.2.3.4")
    assert store.total_bytes() == 10
    store.save("x", "5.6.7.8")


def test_redis_store_expired_entries_leave_the_count(redis_client):
    redis_client.flushdb()
    store = RedisDocumentStore(redis_client, ttl_s=1, max_bytes=25, limit=0)
    store.save("0123456789")
    store.save("0123456789")
    time.sleep(1.2)  # Redis expired the documents (and their key hashes); the next save drops them from the count
    store.save("0123456789")
    assert store.total_bytes() == 10
    assert redis_client.zcard(store.expiry_key) == 1 and redis_client.hlen(store.sizes_key) == 1


# -- real HTTP against `wwt serve` ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    s = Server([f"tiny={tiny_gpt2}"], folder, extra_env={
        "WWT_SHARE_LIMIT": "3", "WWT_SHARE_WINDOW_S": "600", "WWT_MAX_BODY_MB": "2",
        "WWT_DOCUMENTS_MAX_MB": "50", "WWT_SESSION_CAPACITY": "50", "WWT_TRUSTED_PROXIES": "127.0.0.2"}).start()
    s.docs = folder / "data" / "documents"
    yield s
    s.stop()


def _post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 60):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _share(server, text, source="127.0.0.1", forwarded=None):
    headers = {"X-Forwarded-For": forwarded} if forwarded else None
    status, headers, body = http_call(server.url + "wwt/doc", "POST", {"text": text}, headers, source=source)
    return status, headers, json.loads(body)


def test_share_flood_is_refused_with_429_and_stores_nothing(server):
    for i in range(3):
        status, _, r = _share(server, f"draft {i}", source="127.0.0.4")
        assert status == 200 and r["ok"] and r["url"] == f"?doc={r['id']}" and len(r["delete_key"]) >= 32, r
    before = _files(server.docs)
    status, headers, r = _share(server, "one too many", source="127.0.0.4")
    assert status == 429 and r["kind"] == "limit" and r["limit"] == "rate", r
    assert "too many shares from your address: at most 3 every 10 minutes" in r["error"]
    assert 1 <= int(headers["retry-after"]) <= 600
    assert _files(server.docs) == before


def test_behind_a_trusted_proxy_each_user_has_their_own_share_limit(server):
    """A proxy on 127.0.0.2 (trusted) forwards twelve users: each has their own three shares. A
    stranger on 127.0.0.3 forging the header is one client whatever it sends."""
    for user in range(12):
        status, _, r = _share(server, f"user {user}", source="127.0.0.2", forwarded=f"198.51.100.{user + 1}")
        assert status == 200, (user, r)
    for _ in range(2):  # user 1's second and third shares...
        assert _share(server, "again", source="127.0.0.2", forwarded="198.51.100.1")[0] == 200
    # ...and the fourth is refused: a value that is not an address is skipped in the chain
    assert _share(server, "fourth", source="127.0.0.2", forwarded="garbage, 198.51.100.1")[0] == 429
    for i in range(3):
        status, _, r = _share(server, f"forged {i}", source="127.0.0.3", forwarded=f"203.0.113.{i + 1}")
        assert status == 200, r
    status, _, r = _share(server, "forged again", source="127.0.0.3", forwarded="203.0.113.99")
    assert status == 429 and "too many shares from your address" in r["error"]


def test_a_read_link_cannot_delete_and_the_delete_key_can(server):
    status, _, r = _share(server, "delete me over HTTP", source="127.0.0.5")
    assert status == 200
    doc, key = r["id"], r["delete_key"]
    url = f"{server.url}wwt/doc/{doc}"
    status, _, body = http_call(url)
    assert status == 200 and json.loads(body) == {"ok": True, "id": doc, "text": "delete me over HTTP"}
    for headers in (None, {"Authorization": "Bearer not-the-key"}, {"Authorization": key},
                    {"Authorization": "Basic " + key}):
        status, _, body = http_call(url, "DELETE", headers=headers, source="127.0.0.6")
        assert status == 403 and json.loads(body)["kind"] == "forbidden", (headers, body)
    assert f"{doc}.json" in _files(server.docs)  # nothing deleted
    assert key not in (server.docs / f"{doc}.json").read_text()  # the key is kept hashed
    status, _, body = http_call(url, "DELETE", headers={"Authorization": f"Bearer {key}"}, source="127.0.0.6")
    assert status == 200 and json.loads(body) == {"ok": True}
    assert http_call(url)[0] == 404
    assert http_call(url, "DELETE", headers={"Authorization": f"Bearer {key}"})[0] == 404
    assert http_call(f"{server.url}wwt/doc/not-an-id", "DELETE")[0] == 400
    assert f"{doc}.json" not in _files(server.docs)


def test_share_refusals_say_which_limit(server):
    status, _, body = http_call(server.url + "wwt/doc", "POST", {"text": "x" * 1_000_001}, source="127.0.0.7")
    assert status == 400 and "the document has 1,000,001 characters" in json.loads(body)["error"]
    utf8 = json.dumps({"text": "é" * 600_000}, ensure_ascii=False).encode()  # 1.2 MB: under this server's body bound
    status, _, body = http_call(server.url + "wwt/doc", "POST", utf8, source="127.0.0.7")
    r = json.loads(body)
    assert status == 413 and r["limit"] == "size" and "larger than 1000 kB" in r["error"]
    status, _, body = http_call(server.url + "wwt/doc", "POST", b"not json", source="127.0.0.7")
    assert status == 400 and "JSON" in json.loads(body)["error"]
    status, _, body = http_call(server.url + "wwt/doc", "POST", {"text": "   "}, source="127.0.0.7")
    assert status == 400 and json.loads(body)["error"] == "the document is empty"


def test_uploads_and_the_routes_outside_the_queue_are_closed(server):
    """The app takes no files: an upload is refused before it is read and nothing is stored for
    anyone to fetch; the named endpoints answer only through Gradio's queue."""
    boundary = "wwt"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\n"
               f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n").encode()
    for path in ("gradio_api/upload", "gradio_api/upload?upload_id=x"):
        status, _, body = http_call(server.url + path, "POST", payload,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 404 and "takes no files" in json.loads(body)["error"], (path, status, body)
    for path in ("gradio_api/api/score", "gradio_api/run/score"):
        status, _, body = http_call(server.url + path, "POST", {"data": ["Hello"]})
        assert status == 404 and "join the queue" in json.loads(body)["detail"], (path, status, body)
    assert call_over_http(server, "score", {"data": ["Hello"]})[0] == "complete"  # the queued way still works


def _headers_only(server, path: str, length: int):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_an_oversized_body_is_refused_413(server):
    # a Content-Length over WWT_MAX_BODY_MB=2 is answered before a byte of the body is sent
    for path in ("gradio_api/call/complete", "wwt/stream", "gradio_api/component_server", "wwt/doc"):
        status, out = _headers_only(server, "/" + path, 3_000_000)
        assert status == 413, (path, status, out[:200])
        assert "larger than this app accepts (2 MB)" in json.loads(out)["error"]
    # chunked (no Content-Length) is counted as it arrives
    def chunks():
        for _ in range(30):
            yield b"y" * 100_000
    req = urllib.request.Request(server.url + "gradio_api/call/complete", data=chunks(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        status = urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as e:
        status = e.code
    except (ConnectionError, urllib.error.URLError):
        status = 413  # the server may close the connection while the client still writes
    assert status == 413
    # the server is still up, and a body under the bound works
    status, _ = _post(server.url + "gradio_api/call/complete", json.dumps({"data": ["Hi", "tiny", 1, 1]}).encode())
    assert status == 200


def _upload(server, size: int):
    boundary = "wwtboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + b"a" * size + f"\r\n--{boundary}--\r\n".encode()
    return _post(server.url + "gradio_api/upload", body, f"multipart/form-data; boundary={boundary}")


def test_uploads_are_refused_whatever_their_size(server):
    for size in (10, 50_000):
        status, out = _upload(server, size)
        assert status == 404 and "takes no files" in json.loads(out)["error"], (status, out[:300])
    status, out = _headers_only(server, "/gradio_api/upload", 50_000_000)  # refused before it is read
    assert status == 404 and "takes no files" in json.loads(out)["error"]


def test_session_state_is_bounded(monkeypatch):
    """Each plain-HTTP call opens a Gradio session; at most WWT_SESSION_CAPACITY are kept."""
    from app.app_config import AppConfig
    from app.server import build_app
    from app.web.ui import launch_kwargs
    from ui_support import ScriptedBackend
    from app.bench.processes import free_port

    monkeypatch.setenv("WWT_SESSION_CAPACITY", "20")  # read once, at the edge
    config = AppConfig.from_settings()
    demo = build_app(ScriptedBackend(), config)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(config.session_capacity, config.mcp))
    try:
        for i in range(40):
            status, _ = _post(f"http://127.0.0.1:{port}/gradio_api/call/score",
                              json.dumps({"data": [f"Hello {i}"]}).encode())
            assert status == 200
        assert 0 < len(demo.state_holder.session_data) <= 20
    finally:
        demo.close()


# -- Gradio's queue full (WWT_QUEUE_MAX_SIZE): HTTP 503 in our words ---------------------------------

QUEUE_FULL = "busy: the server's queue is full (1 request waiting); try again in a moment"


def test_a_full_gradio_queue_answers_503_in_our_words(monkeypatch):
    """Real HTTP against the app as `wwt serve` builds it: every concurrent slot held, one call waiting
    (WWT_QUEUE_MAX_SIZE=1), then the next is refused at once with 503 and our busy wording."""
    from ui_support import GatedBackend, fill_gradio_queue, launch_in_process, post_json

    from app.app_config import AppConfig

    backend = GatedBackend(models=("m1",))
    demo, url = launch_in_process(backend, AppConfig(queue_max_size=1))
    try:
        assert fill_gradio_queue(url, backend) >= 1
        for path in ("gradio_api/call/score", "gradio_api/call/complete"):
            started = time.monotonic()
            status, out = post_json(url + path, {"data": ["one too many"]})
            assert status == 503, (path, status, out)
            assert time.monotonic() - started < 5  # at once, not after a wait
            body = json.loads(out)
            assert body == {"detail": QUEUE_FULL, "error": QUEUE_FULL, "kind": "busy"}, body
            assert b"Queue is full" not in out
        # other answers pass through as Gradio gives them
        status, out = post_json(url + "gradio_api/call/nope", {"data": []})
        assert status not in (200, 503) and b"busy" not in out
        backend.release()
        from model_support import wait_until

        assert wait_until(lambda: post_json(url + "gradio_api/call/score", {"data": ["again"]})[0] == 200, 30)
    finally:
        backend.release()
        demo.close()


def test_only_gradios_queue_full_answer_is_reworded():
    from app.web.limits import reworded_queue_full

    out = reworded_queue_full(b'{"detail": "Queue is full. Max size is 64 and size is 64."}')
    assert json.loads(out)["detail"] == "busy: the server's queue is full (64 requests waiting); try again in a moment"
    for body in (b'{"detail": "Queue is stopped."}', b"not json", b'["Queue is full. Max size is 1 and size is 1."]',
                 b'{"detail": 503}'):
        assert reworded_queue_full(body) is None
