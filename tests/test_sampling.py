"""Sampling draws from exactly the distribution the reference's processors define."""

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from model.serving.sampling import SamplingSettings, apply_repetition_penalty, greedy_choice, sample_rows


def reference_probs(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    x = logits[None].clone()
    if s.temperature != 1.0:
        x = TemperatureLogitsWarper(s.temperature)(None, x)
    if s.top_k:
        x = TopKLogitsWarper(s.top_k)(None, x)
    if s.top_p < 1.0:
        x = TopPLogitsWarper(s.top_p)(None, x)
    return x.softmax(-1)[0]


@pytest.mark.parametrize("settings", [
    SamplingSettings(top_p=0.7),
    SamplingSettings(top_p=0.9, temperature=0.7),
    SamplingSettings(top_k=4, top_p=0.95),
    SamplingSettings(top_k=3),
    SamplingSettings(temperature=1.5),
])
def test_empirical_distribution_matches_the_reference(settings):
    torch.manual_seed(0)
    logits = torch.randn(12) * 1.5
    expected = reference_probs(logits, settings)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(12)
    rows = 50
    for _ in range(400):  # 20,000 draws
        for t in sample_rows(logits.expand(rows, -1), [settings] * rows, [gen] * rows, [0] * rows):
            counts[t] += 1
    assert counts[expected == 0].sum() == 0  # never a token the reference removes
    assert (counts / counts.sum() - expected).abs().max() < 0.015


def test_flat_rows_keep_exactly_the_reference_top_p_set():
    """On a flat row (as random weights give) only tokens of the reference's kept set come out."""
    torch.manual_seed(0)
    logits = torch.randn(2000) * 0.05
    kept = reference_probs(logits, SamplingSettings(top_p=0.5)) > 0
    gen = torch.Generator().manual_seed(3)
    drawn = sample_rows(logits.expand(64, -1), [SamplingSettings(top_p=0.5)] * 64, [gen] * 64, [0] * 64)
    assert all(bool(kept[t]) for t in drawn)
    assert len(set(drawn)) > 20


def test_rows_are_independent_of_their_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    settings = [SamplingSettings(top_p=0.9, temperature=0.8)] * 5
    together = sample_rows(logits, settings, [torch.Generator().manual_seed(i) for i in range(5)], [0] * 5)
    alone = [sample_rows(logits[i:i + 1], settings[:1], [torch.Generator().manual_seed(i)], [0])[0] for i in range(5)]
    assert together == alone


def test_greedy_rank_never_picks_a_masked_token():
    logits = torch.tensor([0.0, 5.0, float("-inf"), 3.0])
    assert [greedy_choice(logits, r) for r in range(5)] == [1, 3, 0, 0, 0]


def test_repetition_penalty_matches_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    seen = torch.tensor([[3, 7, 7, 20]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits[0], seen[0], 1.3), expected[0])
