"""Reference checkpoints for the model tests: random `transformers` models saved in the Hub's layout.

`transformers` is the test-only reference. Its default initialisation (std 0.02) makes
every logit nearly equal, which would hide mistakes and make greedy choices ties; the
weights are redrawn wide enough that every part of the network matters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import transformers
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
try:
    hf_logging.disable_progress_bar()
except AttributeError:  # older transformers
    pass

# Token-for-token comparisons hold in float32 on the CPU; WWT_TEST_DEVICE tries another device.
DEVICE = os.environ.get("WWT_TEST_DEVICE", "cpu")
STORY = "The weather in the valley turned cold that night. Snow covered the"

VOCAB = 211
SMALL_GPT2 = dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                  bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
SMALL_OPENAI = dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=3, n_head=4)


def reference_config(model_type: str, **overrides):
    if model_type == "openai-gpt":
        return transformers.OpenAIGPTConfig(**{**SMALL_OPENAI, **overrides})
    return transformers.GPT2Config(**{**SMALL_GPT2, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter (LayerNorms near 1, embeddings wide) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if ".ln_" in name or name.startswith("ln_"):
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        elif any(k in name for k in ("wte", "wpe", "tokens_embed", "positions_embed")):
            p.copy_(0.5 * noise)  # strong positions keep greedy runs from collapsing to one token
        else:
            p.copy_(0.15 * noise)
    return model


def save_reference(class_name: str, folder: Path, model_type: str = "gpt2", seed: int = 0, **overrides):
    """Save a random reference model to `folder` with save_pretrained (safetensors) and load it back.

    Returns the reference as `transformers` loads it from `folder`, in eval mode with the
    eager attention path (the one that honours reorder_and_upcast_attn).
    """
    cls = getattr(transformers, class_name)
    config = reference_config(model_type, **overrides)
    model = randomize(cls(config), seed).eval()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


def random_ids(shape, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def slow_down(engine, delay: float) -> None:
    """Make every forward pass of an engine take at least `delay` seconds, so a request is reliably
    still running when a test looks at it."""
    import time

    inner = engine.model.transformer.forward

    def forward(*args, **kwargs):
        time.sleep(delay)
        return inner(*args, **kwargs)

    engine.model.transformer.forward = forward


def wait_until(predicate, timeout: float = 30.0) -> bool:
    """Poll for a state another thread or process reaches (a liveness wait, not a timing assertion)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def idle(engine) -> bool:
    """Whether the engine's slots all come free (its requests are done)."""
    return wait_until(lambda: not engine.scheduler.pool.busy())


# -- engines ----------------------------------------------------------------------------------------


def suggest(engine, text, **settings) -> list:
    """An engine's suggestions (list[Suggestion]) for `text` with these CompletionRequest settings."""
    from model.types import CompletionRequest

    return engine.complete(CompletionRequest(text=text, **settings)).suggestions


def ids(suggestions) -> list[list[int]]:
    return [s.token_ids for s in suggestions]


def prompt_of(engine, text: str, max_new_tokens: int = 8):
    """The prompt the engine builds for `text` (cleaned, cut to fit, its last token healed)."""
    from model.contract import clean_text
    from model.serving.autocomplete import build_prompt

    return build_prompt(engine.tokenizer, clean_text(text), engine.config.n_positions - max_new_tokens, engine.eos)


def whole_characters(tok, token_ids) -> str:
    """What a suggestion shows of these tokens (complete text: nothing is cut at its end)."""
    from model.contract import clean_output

    return clean_output(tok.decode_bytes(token_ids).decode("utf-8", errors="replace"))


def assert_good_suggestions(suggestions, n: int = None):
    assert suggestions, "no suggestion at all"
    if n is not None:
        assert len(suggestions) <= n
    keys = [s.text.strip() for s in suggestions]
    assert all(keys), f"an empty suggestion: {[s.text for s in suggestions]}"
    assert len(set(keys)) == len(keys), f"duplicate suggestions: {keys}"
    for s in suggestions:
        assert s.token_ids and len(s.logprobs) == len(s.token_ids)
        assert all(lp <= 1e-6 for lp in s.logprobs)


def long_document(words: int) -> str:
    from model.network.tiny import corpus_lines

    text = " ".join(corpus_lines())
    while len(text.split()) < words:
        text = text + " " + text
    return " ".join(text.split()[:words])


BATCH_TEXTS = ["Hello there! How are", "The market opened early on Monday. Traders",
               "Scientists measured the speed of sound in water, in air and in steel. The",
               "Once upon a time", "Questions and answers: Where is the library? The library is",
               "Numbers and symbols appear in text too: 1, 2, 3,"]


def hold_every_slot(engine):
    """A long request on all four slots of a (slowed) four-slot engine, so what comes next waits."""
    from model.types import CompletionRequest

    running = engine.submit(CompletionRequest(STORY, n=4, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: len(engine.scheduler.pool.busy()) == 4)
    return running


def fresh_engine_texts(folder, text: str, **settings) -> list[str]:
    """The suggestions a fresh engine on the checkpoint in `folder` gives for this request, checked
    by the contract as the app checks it (stop "auto", temperature 0 greedy): what any server on
    the same checkpoint must answer for the same seeded request, so a test can expect the exact
    suggestions (and their exact number) instead of a range."""
    from model import Engine
    from model.contract import check_completion
    from model.types import CompletionRequest

    engine = Engine.from_pretrained(str(folder), device="cpu", slots=8)
    try:
        request = check_completion(CompletionRequest(text=text, stop="auto", **settings))
        return [s.text for s in engine.complete(request).suggestions]
    finally:
        engine.close()
