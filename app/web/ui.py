"""The page: a gr.Blocks with the Write, Classify, Question answering and Compare tabs.

What each control does lives in callbacks.py (plain functions of the backend); this
module only lays the page out and wires events, the editor's server functions and the
named API endpoints (/complete, /classify, /answer, /score) to them.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial
from pathlib import Path
from typing import Optional

import gradio as gr

from model.errors import caller_error

from . import callbacks
from app.backends.base import Backend
from model.contract import LIMITS

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

# The settings panel tells the editor's JavaScript its values (order = SETTINGS below).
SETTINGS_JS = """(model, n, max_new_tokens, temperature, top_k, top_p, auto) => {
  window.wwtSettings = {model, n, max_new_tokens, temperature, top_k, top_p, auto};
}"""

CLASSIFY_EXAMPLES = [
    ["I could not put this book down; the ending made me cry happy tears.", ""],
    ["The match went to extra time before the home side scored the winner.", "sports, politics, cooking"],
]
QA_EXAMPLES = [
    ["The Transformer was introduced in 2017 in the paper 'Attention Is All You Need'. GPT-2, released by "
     "OpenAI in 2019, is a decoder-only Transformer trained on WebText.", "Who released GPT-2?"],
]


def static_text(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def theme() -> gr.themes.Base:
    """System fonts only: the page must not fetch fonts from the network."""
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet",
                          font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


# The app takes no files: Gradio's /gradio_api/upload refuses anything larger than this.
MAX_UPLOAD = "1kb"


def launch_kwargs(session_capacity: int = 200, mcp: bool = False) -> dict:
    """What Gradio 6 takes at launch() rather than in gr.Blocks: css and theme, the upload cap, and
    how many sessions' state is kept (each plain-HTTP call opens one; AppConfig.session_capacity); in the
    page's head, queue_full.js (a full queue's toast in our words, as the API says it). Gradio's own
    monitoring routes are off: `/gradio_api/monitoring/summary` would show anyone per-endpoint
    timings, and `/metrics` (ops.py) is where the service reports itself."""
    return {"css": static_text("app.css"), "theme": theme(), "max_file_size": MAX_UPLOAD,
            "enable_monitoring": False,
            "head": f"<script>{static_text('queue_full.js')}</script>",
            "state_session_capacity": max(1, session_capacity),
            # the named endpoints as MCP tools at /gradio_api/mcp/ (AppConfig.mcp, WWT_MCP; docs/api.md)
            "mcp_server": bool(mcp)}


# How often the model-status panel asks again (workers come and go; a model loads or fails).
STATUS_REFRESH_S = 5.0

# Dismiss the toasts of one tab when the person goes to another.
CLOSE_TOASTS_JS = "() => { document.querySelectorAll('.toast-close').forEach((b) => b.click()); }"


class WWTBlocks(gr.Blocks):
    """gr.Blocks whose named API endpoints may be called with fewer inputs than they take.

    A plain-HTTP call may leave out trailing inputs: they take their defaults, as through
    gradio_client and Python. Leaving out one without a default (the text) is a readable
    error, where Gradio's own check would answer `{"error": null}`.
    """

    api_functions: dict = {}

    def validate_inputs(self, block_fn, inputs):
        fn = self.api_functions.get(getattr(block_fn, "api_name", None))
        if fn is not None and len(inputs) < len(block_fn.inputs):
            params = list(inspect.signature(fn).parameters.values())[:len(block_fn.inputs)]  # not gr.Request
            missing = params[len(inputs):]
            required = [p.name for p in missing if p.default is inspect.Parameter.empty]
            if required:
                raise gr.Error(f"/{block_fn.api_name} takes {len(params)} inputs in this order: "
                               f"{', '.join(p.name for p in params)}; got {len(inputs)}, so "
                               f"{', '.join(required)} is missing", print_exception=False)
            inputs.extend(p.default for p in missing)
        super().validate_inputs(block_fn, inputs)

    async def process_api(self, block_fn, inputs, state=None, *args, **kwargs):
        """Gradio writes every input and output of a call into its session's config (for deep
        links), and keeps the session (`WWT_SESSION_CAPACITY` of them; every plain-HTTP call opens
        one): so each kept session held its call's text, and a 1 MB text made memory grow by 200
        MB. The named endpoints need none of it after the answer: their values are dropped."""
        try:
            return await super().process_api(block_fn, inputs, state, *args, **kwargs)
        finally:
            fn = self.fns.get(block_fn) if isinstance(block_fn, int) else block_fn
            if state is not None and getattr(fn, "api_name", None) in self.api_functions:
                forget_values(state, [*fn.inputs, *fn.outputs])


def forget_values(state, blocks) -> None:
    """Drop the values a session's config holds for `blocks` (Gradio's SessionState.config_values)."""
    values = getattr(state, "config_values", None)
    if not isinstance(values, dict):
        return  # another Gradio: nothing we know how to drop
    for block in blocks:
        props = (values.get(getattr(block, "_id", None)) or {}).get("props")
        if isinstance(props, dict) and "value" in props:
            props["value"] = None


def _slider(name: str, label: str, info: str, step) -> gr.Slider:
    limit = LIMITS[name]
    return gr.Slider(limit.low, limit.high, value=limit.default, step=step, label=label, info=info, elem_id=f"wwt-{name}")


def _api(fn, *args):
    """Run an API callback; its error becomes a gr.Error whose message reaches the client."""
    try:
        return fn(*args)
    except Exception as e:  # one place decides what the caller is told (model/errors.py)
        raise gr.Error(caller_error(e, log, "API call").message, print_exception=False) from None


def client_address(request: Optional[gr.Request]) -> Optional[str]:
    """The caller's address, as client_identity.ClientIdentity decided it for this request (every
    per-client bound counts by it)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None


def build_ui(backend: Backend, title: str = "Write With Transformer") -> gr.Blocks:
    models = backend.models()
    default_model = backend.default_model() if models else None
    warn = partial(gr.Warning, duration=8)

    # -- server functions the editor calls directly (no queue: keystroke latency matters) --
    def suggest(data, request: gr.Request):
        return callbacks.suggest(backend, data, client_address(request))

    with WWTBlocks(title=title, analytics_enabled=False) as demo:
        gr.HTML(f'<div class="wwt-header"><h1>✍️ {title}</h1><p>Write, press <kbd>Tab</kbd>, and pick what '
                f'the model would write next. GPT-2 family, served by a <b>{backend.kind}</b> backend.</p></div>',
                apply_default_css=False, js_on_load=None)
        with gr.Row(equal_height=True, elem_id="wwt-model-row"):
            model = gr.Dropdown(models, value=default_model, label="Model", scale=1, min_width=260, elem_id="wwt-model",
                                info="used by every tab" + ("; loads on first use" if backend.kind == "local" else ""),
                                allow_custom_value=False)
            model_status = gr.HTML(callbacks.model_status(backend, default_model), scale=2, min_width=260,
                                   container=True,
                                   padding=True, apply_default_css=False, js_on_load=None,
                                   elem_id="wwt-model-status")
        status_timer = gr.Timer(STATUS_REFRESH_S)

        with gr.Tabs() as tabs:
            with gr.Tab("Write", id="write"):
                with gr.Row():
                    with gr.Column(scale=3):
                        editor = gr.HTML(
                            "", html_template=static_text("editor.html"), js_on_load=static_text("editor.js"),
                            server_functions=[suggest], apply_default_css=False, elem_id="wwt-editor",
                            settings={"model": default_model, **callbacks.DEFAULTS, "auto": False},
                        )
                        with gr.Row():
                            token_button = gr.Button("Colour the document by likelihood", size="sm",
                                                     elem_id="wwt-token-button")
                        token_out = gr.HTML(apply_default_css=False, js_on_load=None, elem_id="wwt-token-view")
                    with gr.Column(scale=1, min_width=240):
                        gr.Markdown("### Settings")
                        n = _slider("n", "Suggestions", "how many to show", 1)
                        length = _slider("max_new_tokens", "Length", "new tokens at most", 1)
                        temperature = _slider("temperature", "Temperature", "0 = always the likeliest", 0.05)
                        top_k = _slider("top_k", "Top-k", "0 = off", 1)
                        top_p = _slider("top_p", "Top-p (nucleus)", "1 = off", 0.01)
                        auto = gr.Checkbox(False, label="Suggest as I type", info="after a short pause",
                                           elem_id="wwt-auto")

            with gr.Tab("Classify", id="classify"):
                with gr.Row():
                    with gr.Column():
                        cls_text = gr.Textbox(label="Text", lines=6, elem_id="wwt-cls-text",
                                              placeholder="A sentence or a paragraph to classify")
                        cls_labels = gr.Textbox(label="Candidate labels (optional)", elem_id="wwt-cls-labels",
                                                placeholder="comma-separated, e.g. sports, politics, cooking "
                                                            "(zero-shot); empty uses the model's own head")
                        cls_button = gr.Button("Classify", variant="primary", elem_id="wwt-cls-button")
                        gr.Examples(CLASSIFY_EXAMPLES, [cls_text, cls_labels])
                    with gr.Column():
                        cls_out = gr.Label(label="Label probabilities", elem_id="wwt-cls-out")
                        cls_info = gr.HTML(apply_default_css=False, js_on_load=None, elem_id="wwt-cls-info")

            with gr.Tab("Question answering", id="qa"):
                with gr.Row():
                    with gr.Column():
                        qa_context = gr.Textbox(label="Passage", lines=8, elem_id="wwt-qa-context",
                                                placeholder="The text that holds the answer")
                        qa_question = gr.Textbox(label="Question", elem_id="wwt-qa-question")
                        qa_button = gr.Button("Answer", variant="primary", elem_id="wwt-qa-button")
                        gr.Examples(QA_EXAMPLES, [qa_context, qa_question])
                    with gr.Column():
                        qa_answer = gr.Textbox(label="Answer", interactive=False, elem_id="wwt-qa-answer")
                        qa_view = gr.HTML(apply_default_css=False, js_on_load=None, elem_id="wwt-qa-view")
                        qa_info = gr.HTML(apply_default_css=False, js_on_load=None, elem_id="wwt-qa-info")

            with gr.Tab("Compare model sizes", id="compare"):
                cmp_prompt = gr.Textbox(label="Prompt", lines=3, elem_id="wwt-cmp-prompt",
                                        value="The best thing about writing with a language model is")
                with gr.Row():
                    cmp_models = gr.CheckboxGroup(models, value=models[:3], label="Models", scale=2,
                                                  elem_id="wwt-cmp-models")
                    cmp_length = gr.Slider(1, LIMITS["max_new_tokens"].high, value=16, step=1, label="Length",
                                           scale=1)
                    cmp_n = gr.Slider(1, 5, value=2, step=1, label="Suggestions per model", scale=1)
                cmp_button = gr.Button("Send to all", variant="primary", elem_id="wwt-cmp-button")
                cmp_out = gr.HTML(apply_default_css=False, js_on_load=None, elem_id="wwt-cmp-out")

        # -- events --------------------------------------------------------------------------
        settings = [model, n, length, temperature, top_k, top_p, auto]
        for control in settings:
            control.change(None, inputs=settings, outputs=None, js=SETTINGS_JS, queue=False)

        def on_model(name, progress=gr.Progress(track_tqdm=True)):
            progress(0, desc=f"loading {name}")
            return callbacks.load_model(backend, name)

        model.change(on_model, model, model_status, api_visibility="private")
        # Kept live: a worker that dies (or a model another person loads) shows without a reload.
        status_timer.tick(lambda name: callbacks.model_status(backend, name), model, model_status,
                          show_progress="hidden", queue=False, api_visibility="private")
        tabs.select(None, None, None, js=CLOSE_TOASTS_JS, queue=False)

        def on_tokens(text, name, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            return callbacks.token_view(backend, text, name, client=client_address(request))

        token_button.click(on_tokens, [editor, model], token_out, api_visibility="private")

        def on_classify(text, labels, name, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            return callbacks.classify(backend, text, labels, name, client=client_address(request))

        gr.on([cls_button.click, cls_text.submit], on_classify, [cls_text, cls_labels, model],
              [cls_out, cls_info], api_visibility="private")

        def on_answer(context, question, name, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            return callbacks.answer(backend, context, question, name, client=client_address(request))

        gr.on([qa_button.click, qa_question.submit], on_answer, [qa_context, qa_question, model],
              [qa_view, qa_answer, qa_info], api_visibility="private")

        def on_compare(prompt, chosen, length_, n_, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            return callbacks.compare(backend, prompt, chosen, length_, n_, client=client_address(request))

        cmp_button.click(on_compare, [cmp_prompt, cmp_models, cmp_length, cmp_n], cmp_out,
                         api_visibility="private")

        def on_load(request: gr.Request):
            """Open a shared document (?doc=ID) and refresh the model list (workers come and go)."""
            doc_id = request.query_params.get("doc") if request is not None else None
            text = callbacks.open_shared(backend, doc_id, warn)
            offered = backend.models() or models
            return (gr.skip() if text is None else text), gr.Dropdown(choices=offered), \
                gr.CheckboxGroup(choices=offered), callbacks.model_status(backend, default_model)

        demo.load(on_load, None, [editor, model, cmp_models, model_status], api_visibility="private")

        # -- named API endpoints ------------------------------------------------------------
        # The docstrings' Args are what an agent reads as each MCP tool's parameter docs.
        def complete(text: str, model: str = "", n: int = 3, max_new_tokens: int = 8, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 0.9, fresh: bool = False,
                     seed: Optional[int] = None, request: gr.Request = None) -> dict:
            """Suggest how a text goes on, as an autocomplete would: short continuations that end at a
            natural place (a line end, a sentence end, or 16 words).

            Args:
                text: the text so far; the suggestions continue it from its last character (a half-typed word is completed).
                model: which model writes; empty for the default. The `models` of the page or GET /v1/models list them.
                n: how many distinct suggestions, 1 to 10.
                max_new_tokens: tokens per suggestion at most, 1 to 256.
                temperature: 0 for the likeliest words; higher is more varied (up to 5).
                top_k: sample among the k likeliest tokens only; 0 for no limit.
                top_p: sample within this much probability mass, 0.05 to 1.
                fresh: true to ask for new samples instead of a cached answer.
                seed: a whole number to make the answer repeatable; empty for random.
            """
            return _api(callbacks.api_complete, backend, text, model, n, max_new_tokens, temperature, top_k,
                        top_p, fresh, seed, client_address(request))

        def classify(text: str, labels: str = "", model: str = "", request: gr.Request = None) -> dict:
            """Classify a text: the probability of each label.

            Args:
                text: the text to classify.
                labels: candidate labels, comma-separated (say "sports, politics, science") for zero-shot classification by the language model; empty to use the checkpoint's own classifier, if it has one.
                model: which model; empty for the default.
            """
            return _api(callbacks.api_classify, backend, text, labels, model, client_address(request))

        def answer(question: str, context: str, model: str = "", request: gr.Request = None) -> dict:
            """Answer a question about a passage: the answer's text, its character offsets in the passage (when it is a span of it) and a score.

            Args:
                question: the question, in plain words.
                context: the passage that holds the answer.
                model: which model; empty for the default.
            """
            return _api(callbacks.api_answer, backend, question, context, model, client_address(request))

        def score(text: str, model: str = "", request: gr.Request = None) -> dict:
            """How likely a model finds each token of a text: per token its text, probability and rank (1: the model's first choice). Useful to find surprising words.

            Args:
                text: the text to score.
                model: which model; empty for the default.
            """
            return _api(callbacks.api_score, backend, text, model, client_address(request))

        def compare(text: str, models: str = "", max_new_tokens: int = 16, n: int = 2,
                    request: gr.Request = None) -> dict:
            """Send one text to several models and compare what model size buys: a row per model with its suggestions, speed, size and how likely it found the text.

            Args:
                text: the text to continue.
                models: model names, comma-separated; empty for all offered.
                max_new_tokens: tokens per suggestion, 1 to 256.
                n: suggestions per model, 1 to 10.
            """
            return _api(callbacks.api_compare, backend, text, models, max_new_tokens, n, client_address(request))

        demo.api_functions = {"complete": complete, "classify": classify, "answer": answer, "score": score,
                              "compare": compare}
        # each tool's description and parameter docs come from the function's docstring (MCP, the API page)
        for name, fn in demo.api_functions.items():
            gr.api(fn, api_name=name)
    return demo
