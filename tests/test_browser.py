"""The page in a real headless Chromium against `wwt serve` with the tiny models.

Type, press Tab, pick a suggestion with the keyboard, see it inserted; the other tabs;
screenshots of each tab go to test-artifacts/.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse

import pytest

from ui_support import ARTIFACTS, Server, free_port

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def server(tiny_gpt2, tiny_gpt2_heads, tmp_path_factory):
    s = Server([f"tiny={tiny_gpt2}", f"heads={tiny_gpt2_heads}"], tmp_path_factory.mktemp("serve")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """One tab of the app, with every request it makes recorded."""

    def __init__(self, browser, url):
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.requests = []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.goto(url)
        self.editor = self.page.locator("#wwt-editor textarea")
        self.editor.wait_for(timeout=WAIT_MS)
        self.menu = self.page.locator("#wwt-editor .wwt-menu")
        self.items = self.page.locator("#wwt-editor .wwt-item")

    def suggest_calls(self):
        return [r for r in self.requests if "component_server" in r.url]

    def external(self):
        return [r.url for r in self.requests if urllib.parse.urlparse(r.url).hostname not in ("127.0.0.1", None)
                and not r.url.startswith(("data:", "blob:"))]

    def shown(self) -> list[str]:
        """The suggestions on screen: their text without the number key and the model/latency note."""
        self.items.first.wait_for(timeout=WAIT_MS)
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


def test_tab_shows_suggestions_and_the_keyboard_inserts_one(app):
    app.editor.click()
    app.page.keyboard.type("Once upon a time there was")
    app.page.keyboard.press("Tab")
    texts = app.shown()
    assert 1 <= len(texts) <= 3
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
    freshness = [json.loads(c.post_data)["data"]["fresh"] for c in calls]
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
    app.page.route("**/component_server**", lambda route: held.append(route) if not held else route.continue_())
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
        held[0].continue_()
        app.page.wait_for_timeout(1500)  # A's answer arrives now
        assert app.shown() == newer
        assert app.page.locator("#wwt-editor .wwt-status").text_content() == newer_status
    finally:
        app.page.unroute("**/component_server**")
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
    other = Page(browser, url)
    other.page.wait_for_function("document.querySelector('#wwt-editor textarea').value.length > 0")
    assert other.editor.input_value() == text
    other.page.close()


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
    sent = json.loads(app.suggest_calls()[-1].post_data)["data"]
    assert (sent["model"], sent["n"]) == ("heads", 1)
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
    sent = json.loads(app.suggest_calls()[-1].post_data)["data"]["before"]
    assert 0 < len(sent) <= 65536
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
    assert answer in app.page.locator("#wwt-qa-view").text_content()
    assert "heads" in app.page.locator("#wwt-qa-info").text_content()
    app.screenshot("qa")


def test_compare_tab(app):
    app.tab("Compare model sizes")
    app.page.locator("#wwt-cmp-button").click()
    cards = app.page.locator("#wwt-cmp-out .wwt-card")
    cards.nth(1).wait_for(timeout=WAIT_MS)
    text = app.page.locator("#wwt-cmp-out").text_content()
    assert "tiny" in text and "heads" in text and text.count("tokens/s") == 2
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
