"""Every setting read from the environment, in one registry: name, default and meaning.

The app, the workers and the engine read `WWT_*` variables only through this module, and
docs/configuration.md is generated from the names below (`python -m model.settings >
docs/configuration.md`; tests/test_settings.py checks both). Standard library only: importing
it loads no torch, no Celery, no Gradio.

    from model import settings
    settings.get("WWT_REDIS_URL")                      # the value, or its default
    settings.get_float("WWT_VISIBILITY_TIMEOUT", default=2 * hard)  # empty -> default
    settings.get_int("WWT_SLOTS", default=None)         # empty -> None (auto)
    settings.get_bool("WWT_CUDA_GRAPH")                 # "0", "false", "no", "off" -> False

Reading a name that is not in the registry is a KeyError: a new setting is added here,
with its default and meaning, before it is read anywhere, and docs/configuration.md is
generated again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["SETTINGS", "Setting", "SettingError", "get", "get_bool", "get_choice", "get_float", "get_int", "markdown",
           "names"]


@dataclass(frozen=True)
class Setting:
    name: str
    default: str  # the value when the variable is not set ("" = chosen at run time, see meaning)
    meaning: str
    group: str    # "app", "queue", "engine" or "hub": where it matters


class SettingError(ValueError):
    """A setting's value cannot be used (not a number, ...); the message names the variable."""


_ALL = (
    # -- the app (wwt serve, wwt complete, app.py on Spaces) --------------------------------
    Setting("WWT_BACKEND", "local", "local: the engine runs in the app's process; celery: requests go "
            "through Redis to workers", "app"),
    Setting("WWT_MODELS", "gpt2", "comma-separated models the app offers (short name, Hub id, folder or "
            "name=source); the first is the default", "app"),
    Setting("WWT_REDIS_URL", "redis://localhost:6379/0", "Redis for the Celery broker and results, the "
            "suggestion cache and shared documents (a password goes in the URL: "
            "redis://:PASSWORD@host:6379/0)", "app"),
    Setting("WWT_DEVICE", "", "cpu, cuda or cuda:N; empty picks CUDA when present", "app"),
    Setting("WWT_SLOTS", "", "shorthand for WWT_KV_TOKENS = slots x the model's context and WWT_ROWS = "
            "slots; empty picks by device", "app"),
    Setting("WWT_KV_TOKENS", "", "positions the KV cache holds, all documents and suggestions together "
            "(docs/performance.md says how to size it); empty: WWT_SLOTS x context, or picked by device", "app"),
    Setting("WWT_ROWS", "", "suggestions an engine writes at once (rows of one decode step); empty: "
            "WWT_SLOTS, or picked by device", "app"),
    Setting("WWT_KV_EVICTION", "next-use", "which held document leaves a full KV cache: next-use (the one "
            "expected to be typed last) or lru (least recently used)", "app"),
    Setting("WWT_MEMORY_BUDGET_GB", "8", "embedded mode: the least recently used model is unloaded past "
            "this many GB", "app"),
    Setting("WWT_REQUEST_TIMEOUT", "60", "seconds the app waits for an answer before it says so", "app"),
    Setting("WWT_DATA_DIR", "~/.cache/write-with-transformer", "embedded mode: where shared documents are "
            "kept", "app"),
    Setting("WWT_SHARE_LIMIT", "10", "shares one client (its IP address) may make per WWT_SHARE_WINDOW_S; "
            "0 turns the limit off", "app"),
    Setting("WWT_SHARE_WINDOW_S", "600", "seconds of the per-client share limit's window", "app"),
    Setting("WWT_DOCUMENTS_MAX_MB", "200", "total size of all shared documents kept (embedded: bytes on "
            "disk in the folder; distributed: bytes in Redis' document keys); a share past it is refused",
            "app"),
    Setting("WWT_MAX_BODY_MB", "7", "largest HTTP request body the app reads; a larger one is answered "
            "413 before it is read. The default carries the longest text the contract takes (1,000,000 "
            "characters as a browser counts them) in JSON however it is escaped (6 bytes a character); "
            "uploads are refused outright: the app takes no files", "app"),
    Setting("WWT_SESSION_CAPACITY", "200", "Gradio sessions whose state the app keeps in memory (each "
            "plain-HTTP call opens one); the least recently used go first", "app"),
    Setting("WWT_QUEUE_MAX_SIZE", "64", "requests the Gradio queue (named API endpoints, page events) "
            "holds; past it a call is answered at once that the queue is full (HTTP 503, a busy message); "
            "0: no bound",
            "app"),
    Setting("WWT_TRUSTED_PROXIES", "", "comma-separated addresses and CIDR ranges of proxies whose "
            "X-Forwarded-For / Forwarded headers are believed (the client is the right-most address of the "
            "chain that is not one of them); empty: 127.0.0.1 and ::1, and on Hugging Face Spaces (SPACE_ID set) "
            "also the private ranges its proxy connects from", "app"),
    Setting("WWT_API_KEY", "", "a bearer key the OpenAI-compatible routes (/v1/*) require "
            "(`Authorization: Bearer <key>`); empty: they are open like the page", "app"),
    Setting("WWT_CORS_ORIGINS", "", "comma-separated origins (https://example.org) whose pages may call /v1/* "
            "from a browser; empty: none", "app"),
    Setting("WWT_MAX_PROMPTS", "16", "prompts one /v1/completions call may carry in its list", "app"),
    Setting("WWT_MCP", "on", "offer the named endpoints (complete, classify, answer, score) as MCP tools at "
            "/gradio_api/mcp/", "app"),
    Setting("WWT_MAX_WAITING_PER_CLIENT", "4", "completion requests one client (its IP address, else its "
            "editor id) may have waiting for a model's slots; past it a request is refused as busy at once "
            "(a newer keystroke of one editor still replaces its older request first); 0: no bound", "app"),
    # -- the queue and the workers ---------------------------------------------------------
    Setting("WWT_CONCURRENCY", "8", "tasks one worker runs at once (threads sharing its one engine, which "
            "batches them)", "queue"),
    Setting("WWT_TASK_SOFT_TIME_LIMIT", "15", "seconds a request may decode; the engine then stops and "
            "returns what it has", "queue"),
    Setting("WWT_TASK_TIME_LIMIT", "20", "hard limit in seconds for one task; the visibility timeout must "
            "exceed it", "queue"),
    Setting("WWT_VISIBILITY_TIMEOUT", "", "seconds before a task taken by a worker that died is handed to "
            "another worker; empty: the hard limit plus 10", "queue"),
    Setting("WWT_RESTORE_INTERVAL", "", "seconds between sweeps for tasks left by a dead worker; empty: a "
            "quarter of the visibility timeout, at most 5", "queue"),
    Setting("WWT_RESULT_EXPIRES", "300", "seconds a task's result is kept in Redis", "queue"),
    Setting("WWT_HEARTBEAT_S", "5", "seconds between a worker's announcements of the model it serves",
            "queue"),
    Setting("WWT_HEARTBEAT_TTL_S", "", "seconds an announcement lives; empty: three heartbeats", "queue"),
    Setting("WWT_CACHE_TTL_S", "3600", "seconds a cached suggestion lives in Redis", "queue"),
    Setting("WWT_CACHE_MAX_ENTRIES", "20000", "most suggestion-cache entries kept; the least recently used "
            "go first", "queue"),
    Setting("WWT_AFFINITY", "1", "send a document's completions to the worker that holds its prefix (a queue "
            "per worker, chosen by the start of the text); 0: every task to the model's shared queue", "queue"),
    Setting("WWT_WORKER_NAME", "", "Celery node name of a worker; empty: <queue>-<pid>@<host>", "queue"),
    # -- the engine ----------------------------------------------------------------------------
    Setting("WWT_DTYPE", "", "precision of the models whose spec names none (`gpt2@int8` names one): "
            "float32, bfloat16, float16, int8, int4 or nf4; empty: float16 on CUDA, float32 on CPU", "engine"),
    Setting("WWT_CUDA_GRAPH", "1", "on GPU, capture the decode step as a CUDA graph; 0 turns it off",
            "engine"),
    Setting("WWT_CPU_PACK", "1", "on CPU in float32, hold each body weight matrix as a oneDNN-packed copy in "
            "place of the plain one, and the LM head packed beside the embedding (decode steps of several rows "
            "2-3x faster); 0 keeps only the plain weights", "engine"),
    Setting("WWT_CPU_ONE_ROW", "auto", "on CPU in float32, how a decode step with one row multiplies by the "
            "LM head (and by every matrix with WWT_CPU_PACK=0; packed body matrices use their packed copy): auto "
            "(time the candidates at load and keep the fastest), split, plain or packed", "engine"),
    Setting("WWT_CPU_INT8", "auto", "on CPU, the product of int8 models: auto (time both at load and keep the "
            "faster), dynamic (int8 x int8 with activations quantized per token, fbgemm) or weight-only "
            "(bfloat16 activations, fast where the CPU has AVX-512 BF16 or AMX)", "engine"),
    Setting("WWT_KV_DTYPE", "auto", "dtype of the KV cache: auto (bfloat16 for int8/int4/nf4 models on CPU: half "
            "the bytes a long document's step reads; otherwise the compute dtype), float32, bfloat16 or float16",
            "engine"),
    Setting("WWT_MAX_WAITING", "32", "completion requests that may wait for a model's KV-cache slots "
            "(distributed: tasks waiting in the model's queues); "
            "past it a request is refused at once with a busy error and nothing is queued (time spent "
            "waiting counts toward a request's deadline); 0: no bound", "engine"),
    Setting("WWT_MAX_WAIT_S", "1", "seconds of work an engine may be behind (the prompt tokens still to prefill "
            "and suggestion tokens still to decode of the requests in it, at its rates over the last 30 s); past "
            "it a request is refused as busy at once; 0: no bound", "engine"),
    # -- the Hugging Face Hub (read by huggingface_hub and model/network/weights.py) ---------------
    Setting("HF_HUB_OFFLINE", "", "1: never reach the Hub; only cached or local weights", "hub"),
    Setting("HF_HOME", "~/.cache/huggingface", "where downloaded weights are cached", "hub"),
    Setting("SPACE_ID", "", "set by Hugging Face Spaces in every Space (owner/name): the app then trusts the "
            "Spaces proxy's forwarded client address (WWT_TRUSTED_PROXIES)", "hub"),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _ALL}

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")
_REQUIRED = object()


def names(prefix: str = "") -> list[str]:
    """The registry's names (those starting with `prefix`), in registry order."""
    return [name for name in SETTINGS if name.startswith(prefix)]


def get(name: str) -> str:
    """The variable's value, or its registered default when it is not set. KeyError if unregistered."""
    setting = SETTINGS[name]  # an unknown name is a bug: KeyError
    return os.environ.get(name, setting.default)


def override(name: str, value: str) -> None:
    """Set a registered variable for this process and the processes it starts (the benchmarks
    turn the pace bound off with it). KeyError if unregistered."""
    SETTINGS[name]  # an unknown name is a bug: KeyError
    os.environ[name] = value


def _empty(name: str, value: str, default, what: str):
    if default is _REQUIRED:
        raise SettingError(f"{name} must be {what}, not {value!r}")
    return default


def get_float(name: str, default=_REQUIRED) -> float:
    """The value as a float. Empty gives `default` when one is passed (None included);
    anything else that is not a number is a SettingError that names the variable."""
    value = get(name).strip()
    if value == "":
        return _empty(name, value, default, "a number")
    try:
        return float(value)
    except ValueError:
        raise SettingError(f"{name} must be a number, not {value!r}") from None


def get_int(name: str, default=_REQUIRED) -> int:
    """The value as an int ("8", also "8.0"); empty gives `default` when one is passed (None included)."""
    value = get(name).strip()
    if value == "":
        return _empty(name, value, default, "a whole number")
    try:
        return int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is None or not number.is_integer():
            raise SettingError(f"{name} must be a whole number, not {value!r}") from None
        return int(number)


def get_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value, one of `choices` (any case); empty is the registered default. Anything else is a
    SettingError that names the variable and the choices."""
    value = get(name).strip().lower() or SETTINGS[name].default
    if value not in choices:
        raise SettingError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def get_bool(name: str) -> bool:
    """1/true/yes/on or 0/false/no/off (any case); empty is the registered default's value."""
    value = get(name).strip().lower() or SETTINGS[name].default.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE or value == "":
        return False
    raise SettingError(f"{name} must be 1 or 0 (true or false), not {get(name)!r}")


def model_specs(given=None) -> list[str]:
    """The models to offer, the default first: `given` (say, --model flags) or WWT_MODELS, comma-separated.

    The one place the default model is decided: the first spec of this list.
    """
    specs = given if given else get("WWT_MODELS").split(",")
    return [str(s).strip() for s in specs if s and str(s).strip()]


# -- docs/configuration.md ------------------------------------------------------------------------

COMMAND = "python -m model.settings > docs/configuration.md"

_GROUPS = (
    ("app", "The app", "`wwt serve`, `wwt complete`, and `app.py` on Spaces."),
    ("queue", "The queue and the workers", "The distributed path: `--backend celery`, `wwt worker`, "
     "Redis (see [distributed.md](distributed.md))."),
    ("engine", "The engine", "Read wherever an engine runs: in the app's process or in a worker."),
    ("hub", "The Hugging Face Hub", "Read by `huggingface_hub` and the weight loader "
     "(`model/network/weights.py`)."),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """docs/configuration.md: every setting, grouped by where it matters, as tables of name,
    default and meaning. `python -m model.settings > docs/configuration.md` writes it."""
    lines = [
        f"<!-- Generated from model/settings.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        "# Configuration",
        "",
        f"This page is generated from the settings registry, `model/settings.py`: run `{COMMAND}` "
        "after changing a setting there (a test fails until the page matches).",
        "",
        "Every flag of `wwt` can also be set from the environment. These are all the variables the "
        "app, the workers and the engine read, each with its default and meaning; nothing else reads "
        "them from the environment. A value that cannot be used stops the command with one line that "
        "names the variable. A default shown as *(empty)* is chosen at run time, as its meaning says.",
        "",
        "Why the bounds are what they are, and what a refusal says: [operations.md](operations.md) "
        "and [performance.md](performance.md); the distributed path: [distributed.md](distributed.md).",
    ]
    for group, title, note in _GROUPS:
        members = [s for s in _ALL if s.group == group]
        lines += ["", f"## {title}", "", note, "", "| variable | default | meaning |", "|---|---|---|"]
        for s in members:
            default = f"`{s.default}`" if s.default else "*(empty)*"
            lines.append(f"| `{s.name}` | {_cell(default)} | {_cell(s.meaning)} |")
    unknown = sorted({s.group for s in _ALL} - {g for g, _, _ in _GROUPS})
    if unknown:
        raise ValueError(f"settings in a group with no section: {unknown}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
