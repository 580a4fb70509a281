"""The page in a real headless Chromium against `wwt serve` with the tiny models.

Type, press Tab, pick a suggestion with the keyboard, see it inserted; the other tabs;
screenshots of each tab go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request

import pytest

from app.web.ui import STATUS_REFRESH_S
from model_support import fresh_engine_texts
from ui_support import ARTIFACTS, Server, free_port

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
WAIT_MS = 20_000


def is_suggest(url: str) -> bool:
    """A request for suggestions: the streaming route, or the editor's server function (its fallback)."""
    return "/wwt/stream" in url or "component_server" in url


def sent(request) -> dict:
    """What the editor asked for in a suggestion request."""
    body = json.loads(request.post_data)
    return body["data"] if "component_server" in request.url else body


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """One tab of the app, with every request it makes recorded."""

    def __init__(self, browser, url, context=None):
        """A page of its own (its own localStorage), or one more page in `context`."""
        self.page = context.new_page() if context is not None else browser.new_page(viewport={"width": 1280,
                                                                                              "height": 1000})
        self.requests = []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.goto(url)
        self.editor = self.page.locator("#wwt-editor textarea")
        self.editor.wait_for(timeout=WAIT_MS)
        self.menu = self.page.locator("#wwt-editor .wwt-menu")
        self.items = self.page.locator("#wwt-editor .wwt-item")

    def suggest_calls(self):
        return [r for r in self.requests if is_suggest(r.url)]

    def external(self):
        return [r.url for r in self.requests if urllib.parse.urlparse(r.url).hostname not in ("127.0.0.1", None)
                and not r.url.startswith(("data:", "blob:"))]

    def shown(self) -> list[str]:
        """The suggestions on screen once written in full: their text without the number key and the
        model/latency note."""
        self.items.first.wait_for(timeout=WAIT_MS)
        self.page.wait_for_function("!document.querySelector('#wwt-editor .wwt-status').classList.contains('busy')",
                                    timeout=WAIT_MS)
        return [i.locator(".wwt-rest").text_content().replace("↵", "\n") for i in self.items.all()]

    def screenshot(self, name):
        """After the outputs settle, without toasts left over from earlier steps."""
        ARTIFACTS.mkdir(exist_ok=True)
        for close in self.page.locator(".toast-close").all():
            close.click()
        self.page.wait_for_function("!document.querySelector('.pending, .generating')")
        self.page.wait_for_timeout(400)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def focus_end(self):
        """The cursor at the end of the document, suggestions closed."""
        self.page.get_by_role("tab", name="Write").click()
        self.editor.click()
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("Control+End")

    def tab(self, name):
        self.page.get_by_role("tab", name=name).click()

    def choose_model(self, name):
        self.page.locator("#wwt-model input").click()
        self.page.get_by_role("option", name=name, exact=True).click()
        self.page.locator("#wwt-model-status", has_text=f"{name} ·").wait_for(timeout=WAIT_MS)
        self.page.locator("#wwt-model-status", has_text="loaded").wait_for(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def app(server, browser):
    page = Page(browser, server.url)
    yield page
    page.page.close()


def test_tab_shows_suggestions_and_the_keyboard_inserts_one(app, tiny_gpt2):
    asked = []

    def seeded(route):  # the page sends no seed; one is added so the exact answer is known
        body = json.loads(route.request.post_data)
        if "/wwt/stream" not in route.request.url:
            return route.continue_()
        asked.append({**body, "seed": 13})
        route.continue_(post_data=json.dumps(asked[-1]))

    app.page.route(is_suggest, seeded)
    try:
        app.editor.click()
        app.page.keyboard.type("Once upon a time there was")
        app.page.keyboard.press("Tab")
        texts = app.shown()
    finally:
        app.page.unroute(is_suggest)
    body = asked[-1]
    assert body["before"] == "Once upon a time there was"
    expected = fresh_engine_texts(tiny_gpt2, body["before"], seed=13,
                                  **{k: body[k] for k in ("n", "max_new_tokens", "temperature", "top_k", "top_p")})
    assert texts == expected
    notes = app.items.locator(".wwt-meta").all_text_contents()
    assert all(n.startswith("tiny · ") and n.endswith(" ms") for n in notes)
    assert "tiny" in app.page.locator("#wwt-editor .wwt-status").text_content()
    app.screenshot("write")
    choice = 1 if len(texts) > 1 else 0
    for _ in range(choice):
        app.page.keyboard.press("ArrowDown")
    assert app.items.nth(choice).get_attribute("aria-selected") == "true"
    app.page.keyboard.press("Enter")
    assert app.editor.input_value() == "Once upon a time there was" + texts[choice]
    assert app.menu.is_hidden()
    # the text after the cursor stays where it is
    app.page.keyboard.press("Home")
    app.page.keyboard.type("Title\n")
    app.page.keyboard.press("Tab")
    first = app.shown()[0]
    app.page.keyboard.press("1")
    assert app.editor.input_value() == "Title\n" + first + "Once upon a time there was" + texts[choice]


def test_escape_dismisses_and_tab_again_asks_for_fresh_ones(app):
    app.focus_end()
    app.page.keyboard.type(" and then")
    before = len(app.suggest_calls())
    app.page.keyboard.press("Tab")
    app.shown()
    app.page.keyboard.press("Escape")
    assert app.menu.is_hidden()
    app.page.keyboard.press("Tab")
    app.shown()
    app.page.keyboard.press("Tab")
    app.page.wait_for_function("document.querySelectorAll('#wwt-editor .wwt-item').length > 0")
    calls = app.suggest_calls()[before:]
    assert len(calls) == 3
    freshness = [sent(c)["fresh"] for c in calls]
    assert freshness == [False, True, True]  # asking again at the same place wants new samples
    app.page.keyboard.press("Escape")


def test_typing_along_a_suggestion_keeps_it_without_a_new_request(app):
    app.focus_end()
    app.page.keyboard.type(" The")
    app.page.keyboard.press("Tab")
    texts = app.shown()
    target = texts[0]
    calls = len(app.suggest_calls())
    typed = target[:2] if len(target) > 2 else target[:1]
    app.page.keyboard.type(typed)
    rest = app.shown()
    assert target[len(typed):].rstrip("\n") in [r.rstrip("\n") for r in rest]
    assert app.page.locator("#wwt-editor .wwt-typed").first.text_content() == typed
    assert len(app.suggest_calls()) == calls  # no new request
    app.page.keyboard.press("Escape")


def test_an_answer_to_an_older_text_is_never_shown(app):
    """Request A is held back; the person types and asks again (B); A's late answer must not replace B's."""
    held = []
    app.page.route(is_suggest, lambda route: held.append(route) if not held else route.continue_())
    try:
        app.focus_end()
        app.page.keyboard.type(" Once")
        app.page.keyboard.press("Tab")
        for _ in range(100):
            if held:
                break
            app.page.wait_for_timeout(50)
        assert len(held) == 1
        app.page.keyboard.type(" upon")  # the document changed while the model was thinking
        app.page.keyboard.press("Tab")
        newer = app.shown()
        newer_status = app.page.locator("#wwt-editor .wwt-status").text_content()
        try:
            held[0].continue_()
        except playwright_api.Error:
            pass  # the page already hung up on A (a stream is cancelled when the text changes)
        app.page.wait_for_timeout(1500)  # A's answer arrives now
        assert app.shown() == newer
        assert app.page.locator("#wwt-editor .wwt-status").text_content() == newer_status
    finally:
        app.page.unroute(is_suggest)
    app.page.keyboard.press("Escape")


def test_token_view_and_share_link_reopens_the_document(app, browser, server):
    app.focus_end()
    app.page.keyboard.type(" A line to share.")
    app.page.locator("#wwt-token-button").click()
    view = app.page.locator("#wwt-token-view .wwt-tok")
    view.first.wait_for(timeout=WAIT_MS)
    assert view.count() > 5
    text = app.editor.input_value()
    app.page.locator("#wwt-editor .wwt-share").click()
    link = app.page.locator("#wwt-editor .wwt-link-url")
    app.page.wait_for_function("document.querySelector('#wwt-editor .wwt-link-url').value.includes('?doc=')")
    url = link.input_value()
    assert url.startswith(server.url) and "?doc=" in url
    doc_id = url.split("?doc=")[1]
    assert app.page.locator("#wwt-editor .wwt-unshare").is_visible()  # the author's browser holds the key
    keys = app.page.evaluate("() => JSON.parse(localStorage.getItem('wwt-delete-keys'))")
    assert set(keys) >= {doc_id} and len(keys[doc_id]) >= 32
    other = Page(browser, url)  # another browser: the link reads, and nothing offers to delete
    other.page.wait_for_function("document.querySelector('#wwt-editor textarea').value.length > 0")
    assert other.editor.input_value() == text
    assert other.page.locator("#wwt-editor .wwt-link").is_visible()
    assert other.page.locator("#wwt-editor .wwt-unshare").is_hidden()
    assert other.page.evaluate("() => localStorage.getItem('wwt-delete-keys')") is None
    other.page.close()
    app.page.locator("#wwt-editor .wwt-unshare").click()  # the author deletes it
    app.page.locator("#wwt-editor .wwt-status", has_text="shared copy deleted").wait_for(timeout=WAIT_MS)
    gone = urllib.request.Request(f"{server.url}wwt/doc/{doc_id}")
    try:
        urllib.request.urlopen(gone, timeout=10)
        raise AssertionError("the document is still there")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_suggest_as_i_type(app):
    app.page.locator("#wwt-auto input").check()
    app.focus_end()
    calls = len(app.suggest_calls())
    app.page.keyboard.type(" She")
    assert app.shown()  # appeared after the pause, without Tab
    assert len(app.suggest_calls()) == calls + 1  # one request for the pause, none per keystroke
    app.page.keyboard.press("Escape")
    app.page.locator("#wwt-auto input").uncheck()


def test_settings_panel_reaches_the_editor(app):
    app.choose_model("heads")
    number = app.page.locator("#wwt-n input[type=number]")
    number.fill("1")
    number.press("Enter")
    app.page.wait_for_function("window.wwtSettings && window.wwtSettings.n == 1 && window.wwtSettings.model == 'heads'")
    app.focus_end()
    app.page.keyboard.press("Tab")
    app.shown()
    assert app.items.count() == 1
    assert app.items.locator(".wwt-meta").first.text_content().startswith("heads · ")
    asked = sent(app.suggest_calls()[-1])
    assert (asked["model"], asked["n"]) == ("heads", 1)
    app.page.keyboard.press("Escape")
    number.fill("3")
    number.press("Enter")
    app.choose_model("tiny")
    app.page.wait_for_function("window.wwtSettings.n == 3 && window.wwtSettings.model == 'tiny'")


def test_a_megabyte_document_still_gets_suggestions_but_is_too_big_to_share(app):
    app.page.evaluate("""() => {
        const ta = document.querySelector('#wwt-editor textarea');
        ta.value = 'All work and no play makes Jack a dull boy. '.repeat(24000);
        ta.dispatchEvent(new Event('input', {bubbles: true}));
        ta.focus();
        ta.setSelectionRange(ta.value.length, ta.value.length);
    }""")
    assert len(app.editor.input_value()) > 1_000_000
    app.page.keyboard.press("Tab")
    assert app.shown()  # only a stable tail of the text travels to the model
    before = sent(app.suggest_calls()[-1])["before"]
    assert 0 < len(before) <= 65536
    app.page.keyboard.press("Escape")
    app.page.locator("#wwt-editor .wwt-share").click()
    error = app.page.locator("#wwt-editor .wwt-error")
    error.wait_for(timeout=WAIT_MS)
    assert "the document has 1,056,000 characters; the limit is 1,000,000" in error.text_content()
    app.page.evaluate("""() => {
        const ta = document.querySelector('#wwt-editor textarea');
        ta.value = 'Tabs\tand\u0007 bells';
        ta.dispatchEvent(new Event('input', {bubbles: true}));
    }""")
    app.editor.click()
    app.page.keyboard.press("Control+End")
    app.page.keyboard.press("Tab")
    assert app.shown()
    assert error.is_hidden()  # a new request clears the old message
    app.page.keyboard.press("Escape")


def _wait_for_answer(app, press="Tab"):
    """Press a key that asks the model and wait until its answer is on screen."""
    with app.page.expect_response(lambda r: is_suggest(r.url), timeout=WAIT_MS):
        app.page.keyboard.press(press)
    return app.shown()


def test_ctrl_right_accepts_one_word_and_keeps_the_rest_offered(app):
    app.focus_end()
    app.page.keyboard.type(" Then")
    for _ in range(6):  # a suggestion of at least two words (the tiny model writes at random)
        texts = _wait_for_answer(app)
        several = [i for i, t in enumerate(texts) if len(re.findall(r"\s*\S+", t)) >= 2]
        if several:
            break
    assert several, texts
    for _ in range(several[0]):
        app.page.keyboard.press("ArrowDown")
    target = texts[several[0]]
    before = app.editor.input_value()
    calls = len(app.suggest_calls())
    accepted = ""
    for _ in range(2):  # repeatedly: one word each time, the rest still offered and highlighted
        word = re.match(r"\s*\S+", target[len(accepted):]).group(0)
        app.page.keyboard.press("Control+ArrowRight")
        accepted += word
        assert app.editor.input_value() == before + accepted
        if accepted == target:
            break
        selected = app.page.locator("#wwt-editor .wwt-item.selected")
        assert selected.locator(".wwt-typed").text_content() == accepted
        assert selected.locator(".wwt-rest").text_content().replace("↵", "\n") == target[len(accepted):]
    assert len(app.suggest_calls()) == calls  # no new request
    # closed list: Ctrl+→ is the browser's word navigation again, the text untouched
    app.page.keyboard.press("Escape")
    app.page.keyboard.press("Control+Home")
    app.page.keyboard.press("Control+ArrowRight")
    assert app.editor.input_value() == before + accepted
    assert app.page.evaluate("document.querySelector('#wwt-editor textarea').selectionStart") > 0
    assert app.menu.is_hidden()


def _unlike(text: str, taken: set) -> str:
    while text in taken:
        text += " again"
    return text


def test_tab_again_adds_fresh_suggestions_and_keeps_the_earlier_ones(app):
    app.focus_end()
    app.page.keyboard.type(" Later")
    first = _wait_for_answer(app)

    def rewrite(value):
        """Every suggestion list in an answer: one that repeats the first answer's first suggestion
        is written differently, so that one is sure to stay in the list as an older item."""
        if isinstance(value, list):
            for x in value:
                rewrite(x)
        elif isinstance(value, dict):
            for key, x in value.items():
                if key == "suggestions" and isinstance(x, list):
                    for s in x:
                        if s.get("text") == first[0]:
                            s["text"] = _unlike(s["text"], set(first) | {y.get("text") for y in x})
                else:
                    rewrite(x)
        return value

    def fresh_unlike_the_first(route):
        response = route.fetch()
        if "component_server" in route.request.url:
            route.fulfill(response=response, json=rewrite(response.json()))
            return
        events = []
        for block in response.text().split("\n\n"):
            if not block.strip():
                continue
            name, data = (line.split(": ", 1)[1] for line in block.splitlines())
            events.append(f"event: {name}\ndata: {json.dumps(rewrite(json.loads(data)))}\n\n")
        route.fulfill(response=response, body="".join(events))

    app.page.route(is_suggest, fresh_unlike_the_first)
    try:
        second = _wait_for_answer(app)
    finally:
        app.page.unroute(is_suggest)
    assert set(first) <= set(second) and len(second) <= 9  # earlier ones still reachable
    older = app.page.locator("#wwt-editor .wwt-item.older .wwt-rest").all_text_contents()
    newest = app.page.locator("#wwt-editor .wwt-item:not(.older) .wwt-rest").all_text_contents()
    assert newest and second[:len(newest)] == [t.replace("↵", "\n") for t in newest]  # newest first
    assert len(newest) + len(older) == len(second)
    assert first[0] in [t.replace("↵", "\n") for t in older]
    ARTIFACTS.mkdir(exist_ok=True)
    app.page.screenshot(path=str(ARTIFACTS / "write-history.png"))
    # an earlier one is still picked with its number key
    index = len(newest) + 1
    expected = app.editor.input_value() + older[0].replace("↵", "\n")
    app.page.keyboard.press(str(index))
    assert app.editor.input_value() == expected
    app.page.keyboard.press("Escape")


def test_fewer_suggestions_than_asked_are_said_in_one_quiet_line(app):
    """Duplicates are dropped by the engine; the page says how many came back of how many asked."""
    def one_only(route):
        response = route.fetch()
        if "component_server" in route.request.url:
            body = response.json()
            body["suggestions"] = body["suggestions"][:1]
            route.fulfill(response=response, json=body)
            return
        events = []  # the stream: every event keeps only the first suggestion
        for block in response.text().split("\n\n"):
            if not block.strip():
                continue
            name, data = (line.split(": ", 1)[1] for line in block.splitlines())
            event = json.loads(data)
            if event["type"] == "partial":
                event["suggestions"] = [x for x in event["suggestions"] if x["index"] == 0]
            if event["type"] == "done":  # the page reads `answer`; `result` is for API callers
                event["result"]["suggestions"] = event["result"]["suggestions"][:1]
                event["answer"]["suggestions"] = event["answer"]["suggestions"][:1]
            events.append(f"event: {name}\ndata: {json.dumps(event)}\n\n")
        route.fulfill(response=response, body="".join(events))

    app.page.route(is_suggest, one_only)
    try:
        app.focus_end()
        app.page.keyboard.type(" Again")
        texts = _wait_for_answer(app)
        assert len(texts) == 1
        note = app.page.locator("#wwt-editor .wwt-menu-note")
        assert note.text_content() == "1 of 3: the others were the same"
    finally:
        app.page.unroute(is_suggest)
    app.page.keyboard.press("Escape")
    _wait_for_answer(app)
    assert app.page.locator("#wwt-editor .wwt-menu-note").count() == 0  # all came back: no line
    app.page.keyboard.press("Escape")


def test_suggestions_grow_in_the_list_while_they_are_written(app):
    """Read from the streaming route: the first suggestion shows before the request completes."""
    length = app.page.locator("#wwt-max_new_tokens input[type=number]")
    length.fill("128")
    length.press("Enter")
    app.page.wait_for_function("window.wwtSettings && window.wwtSettings.max_new_tokens == 128")
    try:
        app.focus_end()
        app.page.keyboard.type(" Long ago")
        app.page.evaluate("""() => {
            window.wwtSeen = [];
            const menu = document.querySelector('#wwt-editor .wwt-menu');
            const status = document.querySelector('#wwt-editor .wwt-status');
            new MutationObserver(() => {
                const first = menu.querySelector('.wwt-item .wwt-rest');
                if (first) window.wwtSeen.push([first.textContent, status.classList.contains('busy')]);
            }).observe(menu, {childList: true, subtree: true, characterData: true});
        }""")
        calls = len(app.suggest_calls())
        _wait_for_answer(app)
        assert "/wwt/stream" in app.suggest_calls()[calls].url
        seen = app.page.evaluate("window.wwtSeen")
        while_busy = [text for text, busy in seen if busy]
        assert while_busy, seen  # on screen while the request was still running
        app.page.keyboard.press("Escape")
    finally:
        length.fill("8")
        length.press("Enter")
        app.page.wait_for_function("window.wwtSettings.max_new_tokens == 8")


def test_without_the_streaming_route_the_editor_still_suggests(browser, server):
    page = Page(browser, server.url)
    page.page.route("**/wwt/stream", lambda route: route.fulfill(status=404, body="Not Found"))
    page.editor.click()
    page.page.keyboard.type("Once upon a time")
    page.page.keyboard.press("Tab")
    assert page.shown()
    assert "component_server" in page.suggest_calls()[-1].url  # asked the editor's server function instead
    page.page.close()


def test_the_model_status_stays_live(browser, tiny_gpt2, tiny_gpt2_heads, tmp_path_factory):
    """A change on the server shows in the status panel within seconds, without a reload: here the
    page's model is unloaded (a memory budget that holds one model) when another one is used."""
    s = Server([f"tiny={tiny_gpt2}", f"heads={tiny_gpt2_heads}"], tmp_path_factory.mktemp("live"),
               extra_env={"WWT_MEMORY_BUDGET_GB": "0.000001"}).start()
    try:
        page = Page(browser, s.url)
        status = page.page.locator("#wwt-model-status")
        status.filter(has_text="loaded on cpu").wait_for(timeout=WAIT_MS)
        post = urllib.request.Request(f"{s.url}gradio_api/call/complete", method="POST",
                                      data=json.dumps({"data": ["Hello", "heads"]}).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=30) as r:
            event = json.load(r)["event_id"]
        with urllib.request.urlopen(f"{s.url}gradio_api/call/complete/{event}", timeout=60) as r:
            assert b"event: complete" in r.read()  # heads loaded, tiny unloaded to make room
        status.filter(has_text="loads on first use").wait_for(timeout=3_000 + 1000 * STATUS_REFRESH_S)
        assert "tiny ·" in status.text_content()
        page.page.close()
    finally:
        s.stop()


def test_the_document_survives_a_reload_and_a_share_link_does_not_overwrite_it(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = Page(browser, server.url, context)
        page.editor.click()
        page.page.keyboard.type("My own draft, kept in this browser.")
        page.page.locator("#wwt-editor .wwt-saved", has_text="saved in this browser").wait_for(timeout=WAIT_MS)
        page.page.reload()
        page.editor.wait_for(timeout=WAIT_MS)
        page.page.wait_for_timeout(1000)  # the page's own first value arrives: the draft stays
        assert page.editor.input_value() == "My own draft, kept in this browser."
        # Python has it too: the likelihood view colours the restored text
        page.page.locator("#wwt-token-button").click()
        page.page.locator("#wwt-token-view .wwt-tok").first.wait_for(timeout=WAIT_MS)
        assert "My own draft" in page.page.locator("#wwt-token-view").text_content()
        # a ?doc= link in the same browser shows the shared text, and the draft is still there afterwards
        page.page.locator("#wwt-editor .wwt-share").click()
        page.page.wait_for_function("document.querySelector('#wwt-editor .wwt-link-url').value.includes('?doc=')")
        link = page.page.locator("#wwt-editor .wwt-link-url").input_value()
        page.editor.click()
        page.page.keyboard.press("Control+End")
        page.page.keyboard.type(" More.")
        shared = Page(browser, link, context)
        shared.page.wait_for_function("document.querySelector('#wwt-editor textarea').value.length > 0")
        assert shared.editor.input_value() == "My own draft, kept in this browser."
        shared.editor.click()
        shared.page.keyboard.press("Control+End")
        shared.page.keyboard.type(" Edited under the link.")
        shared.page.wait_for_timeout(500)
        shared.page.close()
        page.page.reload()
        page.editor.wait_for(timeout=WAIT_MS)
        page.page.wait_for_timeout(1000)
        assert page.editor.input_value() == "My own draft, kept in this browser. More."
    finally:
        context.close()


def test_leaving_with_work_the_browser_could_not_keep_asks_first(browser, server):
    page = Page(browser, server.url)
    page.page.evaluate("""() => {
        Storage.prototype.setItem = function () { throw new DOMException('full', 'QuotaExceededError'); };
    }""")
    page.editor.click()
    page.page.keyboard.type("Words that cannot be stored")
    page.page.locator("#wwt-editor .wwt-saved.unsaved").wait_for(timeout=WAIT_MS)
    asked = []
    page.page.on("dialog", lambda dialog: (asked.append(dialog.type), dialog.accept()))
    page.page.goto("about:blank")  # leaving the page
    assert asked == ["beforeunload"]
    page.page.close()
    # work the browser keeps: leaving asks nothing
    calm = Page(browser, server.url)
    calm.editor.click()
    calm.page.keyboard.type("Words this browser keeps")
    calm.page.locator("#wwt-editor .wwt-saved", has_text="saved in this browser").wait_for(timeout=WAIT_MS)
    calm.page.on("dialog", lambda dialog: (asked.append(dialog.type), dialog.accept()))
    calm.page.goto("about:blank")
    assert asked == ["beforeunload"]
    calm.page.close()


def test_phone_layout_keeps_the_model_status_readable(browser, server):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page.goto(server.url)
        page.locator("#wwt-editor textarea").wait_for(timeout=WAIT_MS)
        status = page.locator("#wwt-model-status .wwt-info")
        status.wait_for(timeout=WAIT_MS)
        box = page.locator("#wwt-model-status").bounding_box()
        assert box["width"] >= 250 and box["x"] >= 0 and box["x"] + box["width"] <= 390
        clipped = page.evaluate("""() => { const e = document.querySelector('#wwt-model-status .wwt-info');
            return [e.scrollWidth, e.clientWidth, e.scrollHeight, e.clientHeight]; }""")
        assert clipped[0] <= clipped[1] + 1 and clipped[2] <= clipped[3] + 1, clipped
        assert page.evaluate("document.documentElement.scrollWidth") <= 391  # nothing runs off the side
        ARTIFACTS.mkdir(exist_ok=True)
        page.wait_for_timeout(400)
        page.screenshot(path=str(ARTIFACTS / "phone.png"))
        page.screenshot(path=str(ARTIFACTS / "phone-full.png"), full_page=True)
    finally:
        page.close()


def test_classify_tab(app):
    app.tab("Classify")
    app.page.locator("#wwt-cls-text textarea").fill("The striker scored twice in the final.")
    app.page.locator("#wwt-cls-labels textarea, #wwt-cls-labels input").first.fill("sports, politics")
    app.page.locator("#wwt-cls-button").click()
    app.page.locator("#wwt-cls-info", has_text="zero-shot").wait_for(timeout=WAIT_MS)
    out = app.page.locator("#wwt-cls-out").text_content()
    assert "sports" in out and "politics" in out and "%" in out
    assert "tiny" in app.page.locator("#wwt-cls-info").text_content()
    app.screenshot("classify")
    # bad input: a clear message on the page, no traceback, and the page keeps working
    app.page.locator("#wwt-cls-text textarea").fill("")
    app.page.locator("#wwt-cls-button").click()
    app.page.locator("#wwt-cls-info", has_text="the text is empty").wait_for(timeout=WAIT_MS)
    assert app.page.get_by_text("the text is empty").count() >= 1
    assert app.page.locator(".toast-wrap", has_text="the text is empty").count() == 0  # said once, in place
    assert "Traceback" not in app.page.content()


def test_question_answering_tab(app):
    app.choose_model("heads")
    app.tab("Question answering")
    context = "Alice went to the market with Bob on Sunday morning."
    app.page.locator("#wwt-qa-context textarea").fill(context)
    app.page.locator("#wwt-qa-question textarea, #wwt-qa-question input").first.fill("Who went to the market?")
    app.page.locator("#wwt-qa-button").click()
    app.page.locator("#wwt-qa-info", has_text="extracted").wait_for(timeout=WAIT_MS)
    answer = app.page.locator("#wwt-qa-answer textarea, #wwt-qa-answer input").first.input_value()
    assert answer and answer in context
    # the passage as one flowing text, the answer marked in place (not cut into labelled lines)
    passage = app.page.locator("#wwt-qa-view .wwt-passage")
    assert passage.text_content() == context
    assert passage.locator("mark.wwt-answer").text_content() == answer
    assert app.page.locator("#wwt-qa-view").get_by_text("answer", exact=True).count() == 0  # no label badge
    lines = app.page.evaluate("""() => { const p = document.querySelector('#wwt-qa-view .wwt-passage');
        return Math.round(p.getBoundingClientRect().height / parseFloat(getComputedStyle(p).lineHeight)); }""")
    assert lines <= 2  # a short passage stays on one line (plus padding)
    assert "heads" in app.page.locator("#wwt-qa-info").text_content()
    app.screenshot("qa")


def test_compare_tab(app):
    app.tab("Compare model sizes")
    app.page.locator("#wwt-cmp-button").click()
    cards = app.page.locator("#wwt-cmp-out .wwt-card")
    cards.nth(1).wait_for(timeout=WAIT_MS)
    text = app.page.locator("#wwt-cmp-out").text_content()
    assert "tiny" in text and "heads" in text and text.count("tokens/s") == 2
    # the chart: one panel per measure, one bar per model in each, the likelihood of the prompt too
    panels = app.page.locator("#wwt-cmp-out .wwt-chart-panel")
    metrics = [p.get_attribute("data-metric") for p in panels.all()]
    assert metrics == ["parameters", "weight_bytes", "ms", "tokens_per_s", "perplexity"]
    for panel in panels.all():
        bars = panel.locator(".wwt-bar")
        assert [b.get_attribute("data-model") for b in bars.all()] == ["tiny", "heads"]
        widths = [b.locator(".wwt-bar-track i").bounding_box()["width"] for b in bars.all()]
        assert all(w > 0 for w in widths) and max(widths) > 50  # drawn, the largest nearly full
    assert "per token" in panels.last.locator(".wwt-bar").first.get_attribute("title")
    app.screenshot("compare")


def test_the_page_made_no_request_beyond_the_server(app):
    assert app.external() == []


def test_backend_down_shows_a_message_in_the_editor(browser, tmp_path_factory):
    """The queue backend pointed at a Redis that is not there: the page says so and keeps working."""
    s = Server(["tiny"], tmp_path_factory.mktemp("down"), backend="celery",
               redis_url=f"redis://127.0.0.1:{free_port()}/0")
    s.start()
    try:
        page = Page(browser, s.url)
        page.editor.click()
        page.page.keyboard.type("Hello")
        page.page.keyboard.press("Tab")
        error = page.page.locator("#wwt-editor .wwt-error")
        error.wait_for(timeout=WAIT_MS)
        assert "Redis" in error.text_content() and "Traceback" not in error.text_content()
        assert page.menu.is_hidden()
        page.page.keyboard.press("Tab")  # still answering
        page.page.wait_for_function("document.querySelector('#wwt-editor .wwt-status').textContent === ''")
        assert not error.is_hidden()
        page.screenshot("backend-down")
        page.page.close()
    finally:
        s.stop()


def test_a_full_queue_is_said_in_our_words_on_the_page(browser, monkeypatch):
    """Gradio's page client replaces a 503's text with its own; the page says the server's busy
    message instead (app/web/static/queue_full.js), as a plain HTTP caller reads it."""
    from ui_support import GatedBackend, fill_gradio_queue, launch_in_process, post_json

    from app.app_config import AppConfig

    backend = GatedBackend(models=("m1",))
    demo, url = launch_in_process(backend, AppConfig(queue_max_size=1))
    try:
        page = Page(browser, url)
        page.page.wait_for_function("!!window.fetch.wwtQueueFull", timeout=WAIT_MS)
        joins = []  # the page's own load event goes through the queue first: let it finish
        for _ in range(200):
            joins = [r for r in page.requests if "queue/join" in r.url]
            if joins:
                break
            page.page.wait_for_timeout(100)
        assert joins and joins[0].response().status == 200
        page.page.wait_for_timeout(500)
        fill_gradio_queue(url, backend)
        assert post_json(url + "gradio_api/call/score", {"data": ["one too many"]})[0] == 503
        page.page.locator("#wwt-token-button").click()
        toast = page.page.locator(".toast-wrap", has_text="busy: the server's queue is full")
        toast.first.wait_for(timeout=WAIT_MS)
        assert "(1 request waiting); try again in a moment" in toast.first.text_content()
        assert page.page.locator(".toast-wrap", has_text="currently busy").count() == 0
        page.page.close()
    finally:
        backend.release()
        demo.close()
