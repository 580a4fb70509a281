"""The fixed-shape decode step (what a GPU captures as a CUDA graph) equals the ordinary step."""

import pytest
import torch

from model import Engine, load
from model.serving import kv_cache
from model.serving.kv_cache import KVCache
from model.serving.decode_graph import FixedShapeDecoder
from model_support import suggest


@pytest.fixture(scope="module")
def engines(tiny_gpt2):
    plain = Engine.from_pretrained(str(tiny_gpt2), slots=6, cuda_graph=False)
    fixed = Engine.from_pretrained(str(tiny_gpt2), slots=6, cuda_graph=True)
    yield plain, fixed
    plain.close()
    fixed.close()


def test_fixed_shape_engine_is_on_only_when_asked(engines):
    plain, fixed = engines
    assert plain.scheduler.runner.fixed_shape is None
    assert isinstance(fixed.scheduler.runner.fixed_shape, FixedShapeDecoder)
    assert fixed.scheduler.runner.fixed_shape.graph is None  # no GPU here: the same step runs eagerly


@pytest.mark.parametrize("text", ["Hello there", "The weather in the valley turned", "Hel", ""])
def test_same_suggestions_greedy_and_sampled(engines, text):
    plain, fixed = engines
    for kwargs in (dict(greedy=True), dict(seed=5)):
        a = suggest(plain, text, n=3, max_new_tokens=10, stop=None, **kwargs)
        b = suggest(fixed, text, n=3, max_new_tokens=10, stop=None, **kwargs)
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_step_logits_match_full_forward(tiny_gpt2):
    """Rows in slots 4 and 1 at different positions; the idle slots park and change nothing used."""
    model = load(str(tiny_gpt2))
    cache = KVCache(model.config, 5)
    step = FixedShapeDecoder(model, cache, rows=5, capture=False)
    seqs = {4: [5, 9, 11, 20, 33], 1: [7, 8, 2]}
    with torch.inference_mode():
        for slot, ids in seqs.items():  # prefill all but the last token through the ordinary path
            model.transformer(torch.tensor([ids[:-1]]), positions=torch.arange(len(ids) - 1)[None],
                              cache=cache.view([slot], torch.arange(len(ids) - 1)[None]))
        logits = step.step([4, 1], [seqs[4][-1], seqs[1][-1]], [len(seqs[4]) - 1, len(seqs[1]) - 1])
        for row, ids in enumerate(seqs.values()):
            full = model(torch.tensor([ids]))[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-4, rtol=0)
    assert step.positions.shape == (5, 1) and step.tables.shape == (5, cache.blocks.blocks_for(cache.context))


@pytest.mark.parametrize("slots", [[0, 1, 2, 3, 4], [4, 0, 3, 1, 2]])
def test_gathered_read_of_many_rows_equals_a_view_per_row(tiny_gpt2, monkeypatch, slots):
    """Many short rows are read in one gathered attention call; the result is the per-row one."""
    model = load(str(tiny_gpt2))
    seqs = [[5 + i, 9, 11 + i, 20, 33][: 2 + i % 3] for i in range(5)]

    def decode(gather: bool):
        monkeypatch.setattr(kv_cache, "GATHER_MIN_ROWS", 4 if gather else 10**9)
        cache = KVCache(model.config, 5)
        with torch.inference_mode():
            for slot, ids in zip(slots, seqs):
                model.transformer(torch.tensor([ids[:-1]]), positions=torch.arange(len(ids) - 1)[None],
                                  cache=cache.view([slot], torch.arange(len(ids) - 1)[None]))
            ids = torch.tensor([[s[-1]] for s in seqs])
            pos = torch.tensor([[len(s) - 1] for s in seqs])
            return model.lm_head(model.transformer(ids, positions=pos, cache=cache.view(slots, pos)))[:, -1]

    gathered, per_row = decode(True), decode(False)
    torch.testing.assert_close(gathered, per_row, atol=1e-5, rtol=0)
    for row, ids in enumerate(seqs):
        with torch.inference_mode():
            torch.testing.assert_close(gathered[row], model(torch.tensor([ids]))[0, -1], atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_captured_cuda_graph_suggests_what_the_ordinary_step_does(tiny_gpt2):
    """On a GPU the fixed-shape step is captured once and replayed; in float32 its greedy suggestions
    are the ordinary step's (a float16 run may break a near-tie the other way, so not compared)."""
    plain = Engine.from_pretrained(f"{tiny_gpt2}@float32", device="cuda", slots=6, cuda_graph=False)
    fixed = Engine.from_pretrained(f"{tiny_gpt2}@float32", device="cuda", slots=6, cuda_graph=True)
    try:
        assert fixed.scheduler.runner.fixed_shape.graph is not None
        for text in ("Hello there", "The weather in the valley turned", ""):
            a = suggest(plain, text, n=3, max_new_tokens=10, stop=None, greedy=True)
            b = suggest(fixed, text, n=3, max_new_tokens=10, stop=None, greedy=True)
            assert [s.token_ids for s in a] == [s.token_ids for s in b]
            for x, y in zip(a, b):
                assert x.logprobs == pytest.approx(y.logprobs, abs=1e-3)
    finally:
        plain.close()
        fixed.close()
