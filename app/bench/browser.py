"""`python -m app.bench.browser`: what a person waits for in a real browser, with streaming.

Starts `wwt serve` on random weights at gpt2's size, opens the page in headless Chromium, types
a document and presses Tab; the page itself records (performance.now) when the first words of a
suggestion appear and when all suggestions are complete. Printed for Length 8 and 64: the median
and p95 of both, over fresh keystrokes. A report, not a test; it needs the test extras
(`transformers`, `playwright`) and Debian's `chromium`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from app.bench.processes import free_port

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCUMENT = ("The history of the written word is long. People wrote on clay, then on papyrus, then on paper, "
            "and now they write on screens that suggest the next words as they type. ")
WATCH = """() => {
    const editor = document.querySelector('#wwt-editor');
    const status = editor.querySelector('.wwt-status');
    window.wwtTimes = {};
    new MutationObserver(() => {
        const t = window.wwtTimes;
        if (t.start === undefined) return;
        const first = editor.querySelector('.wwt-item .wwt-rest');
        if (t.first === undefined && first && first.textContent.trim()) t.first = performance.now() - t.start;
        if (t.first !== undefined && t.done === undefined && !status.classList.contains('busy')) {
            t.done = performance.now() - t.start;
        }
    }).observe(editor, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def _serve(folder: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "WWT_DATA_DIR": str(folder / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--model", f"gpt2-random={folder}",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wwt serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("wwt serve did not start within 300 s")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def measure(url: str, lengths=(64, 8), repeats: int = 5) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    results = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        editor = page.locator("#wwt-editor textarea")
        editor.wait_for(timeout=60_000)
        editor.click()
        page.keyboard.type(DOCUMENT)
        page.evaluate(WATCH)
        for length in lengths:  # 64 first: setting the default (8) first would change nothing
            box = page.locator("#wwt-max_new_tokens input[type=number]")
            box.fill(str(length))
            box.press("Enter")
            page.wait_for_function(f"window.wwtSettings && window.wwtSettings.max_new_tokens == {length}")
            editor.click()
            page.keyboard.press("End")
            first, done = [], []
            for r in range(repeats + 1):  # the first keystroke warms up the engine's shapes
                page.keyboard.press("Escape")
                page.keyboard.type(f" word{length}x{r}")
                page.evaluate("() => { window.wwtTimes = {start: performance.now()}; }")
                page.keyboard.press("Tab")
                page.wait_for_function("window.wwtTimes.done !== undefined", timeout=120_000)
                times = page.evaluate("window.wwtTimes")
                if r:
                    first.append(times["first"])
                    done.append(times["done"])
            results[length] = {"first_words_ms": statistics.median(first), "first_words_p95_ms": _pct(first, 95),
                               "complete_ms": statistics.median(done), "complete_p95_ms": _pct(done, 95),
                               "repeats": repeats}
        browser.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from model.serving.threads import in_fresh_thread

    from .speed import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        in_fresh_thread(make_checkpoint, folder)
        port = free_port()
        proc = _serve(folder, port, folder / "serve.log")
        try:
            results = measure(f"http://127.0.0.1:{port}/", repeats=args.repeats)
        finally:
            proc.terminate()
            proc.wait(30)
    print("in a real browser (headless Chromium), gpt2-size random weights on CPU, 3 suggestions:")
    for length, r in sorted(results.items()):
        print(f"  Length {length:>3}: Tab -> first words {r['first_words_ms']:.0f} ms (p95 {r['first_words_p95_ms']:.0f}),"
              f" Tab -> all complete {r['complete_ms']:.0f} ms (p95 {r['complete_p95_ms']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
