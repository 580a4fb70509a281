"""Our GPT-2 / OpenAI GPT against `transformers` on random checkpoints both load from one folder.

Logits within 1e-4 for every config field that changes the math, every head, padded
batches, the static KV cache, and greedy / penalised / seeded generation.
"""

from __future__ import annotations

import pytest
import torch

import model
from model.serving import generation
from model.serving import cpu_kernels, kv_cache
from model.serving.kv_cache import KVCache

from model_support import VOCAB, max_diff, random_ids, save_reference

ATOL = 1e-4

GPT2_VARIANTS = {
    "relu": dict(activation_function="relu"),
    "silu": dict(activation_function="silu"),
    "gelu": dict(activation_function="gelu"),
    "tanh": dict(activation_function="tanh"),
    "gelu_new": dict(activation_function="gelu_new"),
    "no_scale_attn_weights": dict(scale_attn_weights=False),
    "inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast": dict(reorder_and_upcast_attn=True),
    "upcast_and_inverse_idx": dict(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True),
    "n_inner": dict(n_inner=72),
    "layer_norm_epsilon": dict(layer_norm_epsilon=1e-2),
}
OPENAI_VARIANTS = {"gelu": dict(afn="gelu"), "relu": dict(afn="relu"), "silu": dict(afn="silu"),
                   "swish": dict(afn="swish")}


def right_padded(lengths, T, pad, seed):
    ids = random_ids((len(lengths), T), seed)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = pad
    return ids, mask


def assert_close_where(ours, ref, mask):
    """Compare [B, T, ...] outputs only at the positions `mask` keeps."""
    keep = mask.bool()
    assert keep.any()
    d = max_diff(ours[keep], ref[keep])
    assert d <= ATOL, f"max abs difference {d:.3g} > {ATOL}"


# -- language model: every config variant ---------------------------------------------------

@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_gpt2_lm_logits_match(tmp_path, variant):
    ref = save_reference("GPT2LMHeadModel", tmp_path, seed=3, **GPT2_VARIANTS[variant])
    ours = model.load(str(tmp_path), head="lm", device="cpu")
    assert ours.config.activation_function == ref.config.activation_function
    ids = random_ids((2, 23), seed=5)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, 23, VOCAB)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # A batch padded on the right and on the left: compare the real tokens only.
    ids, mask = right_padded([23, 9], 23, pad=0, seed=6)
    mask[0, :4] = 0  # row 0 is left-padded instead
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert_close_where(got, expected, mask)


def test_variants_really_change_the_output(tmp_path):
    """Guards the test above: each variant must change the logits, or matching it proves nothing."""
    ids = random_ids((1, 17), seed=5)
    outs = {}
    for variant in ("gelu_new", "relu", "no_scale_attn_weights", "inverse_layer_idx", "n_inner",
                    "layer_norm_epsilon"):
        ref = save_reference("GPT2LMHeadModel", tmp_path / variant, seed=3, **GPT2_VARIANTS[variant])
        with torch.no_grad():
            outs[variant] = ref(ids).logits
    for variant, out in outs.items():
        if variant != "gelu_new" and variant != "n_inner":  # n_inner changes the weights' shapes
            assert max_diff(out, outs["gelu_new"]) > 1e-2, variant


@pytest.mark.parametrize("variant", sorted(OPENAI_VARIANTS))
def test_openai_gpt_lm_logits_match(tmp_path, variant):
    ref = save_reference("OpenAIGPTLMHeadModel", tmp_path, model_type="openai-gpt", seed=4,
                         **OPENAI_VARIANTS[variant])
    ours = model.load(str(tmp_path), head="lm", device="cpu")
    assert ours.config.model_type == "openai-gpt"
    ids = random_ids((2, 21), seed=7)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, 21, VOCAB)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    ids, mask = right_padded([21, 8], 21, pad=0, seed=8)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert_close_where(got, expected, mask)


def test_full_context_length(tmp_path):
    """All n_positions tokens at once: the last position embedding and the whole causal mask."""
    ref = save_reference("GPT2LMHeadModel", tmp_path, seed=11)
    ours = model.load(str(tmp_path), device="cpu")
    ids = random_ids((1, 64), seed=12)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=ATOL, rtol=0)


# -- heads --------------------------------------------------------------------------------------

PAD = 3


@pytest.mark.parametrize("labels", [None, ["neg", "neutral", "pos"]])
def test_gpt2_sequence_classification(tmp_path, labels):
    extra = {"pad_token_id": PAD}
    if labels:
        extra.update(num_labels=3, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    ref = save_reference("GPT2ForSequenceClassification", tmp_path, seed=13, **extra)
    ours = model.load(str(tmp_path), head="sequence-classification", device="cpu")
    num_labels = 3 if labels else 2
    assert ours.config.num_labels == num_labels
    if labels:
        assert [ours.config.id2label[i] for i in range(3)] == labels
    ids = random_ids((3, 19), seed=14, vocab=VOCAB - 10) + 10  # no accidental pad tokens
    ids, mask = ids, torch.ones_like(ids)
    for b, n in enumerate([19, 11, 4]):
        ids[b, n:] = PAD
        mask[b, n:] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert got.shape == (3, num_labels)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The pooled logit is the last real token's: it differs between rows of different length.
    assert max_diff(got[1], got[2]) > 1e-3

    # Left padding: the rightmost real token is still the one pooled.
    ids, mask = ids.clone(), mask.clone()
    ids[1] = torch.cat([torch.full((8,), PAD), ids[1, :11]])
    mask[1] = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(11, dtype=torch.long)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits,
                                   atol=ATOL, rtol=0)


def test_openai_gpt_sequence_classification(tmp_path):
    ref = save_reference("OpenAIGPTForSequenceClassification", tmp_path, model_type="openai-gpt", seed=15,
                         pad_token_id=PAD, num_labels=4)
    ours = model.load(str(tmp_path), head="sequence-classification", device="cpu")
    ids = random_ids((2, 13), seed=16, vocab=VOCAB - 10) + 10
    mask = torch.ones_like(ids)
    ids[1, 7:] = PAD
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_sequence_classification_single_text_without_pad_token(tmp_path):
    ref = save_reference("GPT2ForSequenceClassification", tmp_path, seed=17)
    ours = model.load(str(tmp_path), head="sequence-classification", device="cpu")
    ids = random_ids((1, 9), seed=18)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=ATOL, rtol=0)


def test_gpt2_question_answering(tmp_path):
    ref = save_reference("GPT2ForQuestionAnswering", tmp_path, seed=19)
    ours = model.load(str(tmp_path), head="question-answering", device="cpu")
    ids = random_ids((2, 17), seed=20)
    with torch.no_grad():
        out = ref(ids)
        start, end = ours(ids)
    assert start.shape == end.shape == (2, 17)
    torch.testing.assert_close(start, out.start_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(end, out.end_logits, atol=ATOL, rtol=0)
    assert max_diff(start, end) > 1e-3  # start and end are different rows of qa_outputs


def test_gpt2_token_classification(tmp_path):
    ref = save_reference("GPT2ForTokenClassification", tmp_path, seed=21, num_labels=5)
    ours = model.load(str(tmp_path), head="token-classification", device="cpu")
    ids = random_ids((2, 15), seed=22)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, 15, 5)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


DOUBLE_HEAD_VARIANTS = {
    "tanh": dict(summary_activation="tanh"),
    "no_activation": dict(summary_activation=None),
    "proj_to_hidden": dict(summary_proj_to_labels=False, summary_activation="tanh"),
    "relu": dict(summary_activation="relu"),
    "gelu_new_no_proj": dict(summary_use_proj=False, summary_activation="gelu_new"),
}


@pytest.mark.parametrize("variant", sorted(DOUBLE_HEAD_VARIANTS))
def test_gpt2_double_heads(tmp_path, variant):
    ref = save_reference("GPT2DoubleHeadsModel", tmp_path, seed=23, **DOUBLE_HEAD_VARIANTS[variant])
    ours = model.load(str(tmp_path), head="double-heads", device="cpu")
    B, C, T = 2, 3, 11
    ids = random_ids((B, C, T), seed=24)
    mc_token_ids = torch.tensor([[10, 4, 7], [0, 10, 5]])
    with torch.no_grad():
        out = ref(ids, mc_token_ids=mc_token_ids)
        lm, mc = ours(ids, mc_token_ids=mc_token_ids)
    assert lm.shape == (B, C, T, VOCAB)
    assert mc.shape == out.mc_logits.shape
    assert mc.shape == ((B, C) if DOUBLE_HEAD_VARIANTS[variant].get("summary_use_proj", True)
                        and DOUBLE_HEAD_VARIANTS[variant].get("summary_proj_to_labels", True) else (B, C, 48))
    torch.testing.assert_close(lm, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(mc, out.mc_logits, atol=ATOL, rtol=0)


def test_double_heads_with_padding(tmp_path):
    ref = save_reference("GPT2DoubleHeadsModel", tmp_path, seed=27, summary_activation="tanh")
    ours = model.load(str(tmp_path), head="double-heads", device="cpu")
    ids = random_ids((2, 2, 10), seed=28)
    mask = torch.ones_like(ids)
    lengths = torch.tensor([[10, 6], [3, 8]])
    for b in range(2):
        for c in range(2):
            mask[b, c, lengths[b, c]:] = 0
            ids[b, c, lengths[b, c]:] = 0
    mc_token_ids = lengths - 1  # the classification token ends each choice
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, mc_token_ids=mc_token_ids)
        lm, mc = ours(ids, attention_mask=mask, mc_token_ids=mc_token_ids)
    assert_close_where(lm, out.logits, mask)
    torch.testing.assert_close(mc, out.mc_logits, atol=ATOL, rtol=0)


def test_openai_gpt_double_heads(tmp_path):
    ref = save_reference("OpenAIGPTDoubleHeadsModel", tmp_path, model_type="openai-gpt", seed=25,
                         summary_activation="tanh")
    ours = model.load(str(tmp_path), head="double-heads", device="cpu")
    ids = random_ids((2, 2, 9), seed=26)
    mc_token_ids = torch.tensor([[8, 3], [5, 8]])
    with torch.no_grad():
        out = ref(ids, mc_token_ids=mc_token_ids)
        lm, mc = ours(ids, mc_token_ids=mc_token_ids)
    assert mc.shape == (2, 2)
    torch.testing.assert_close(lm, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(mc, out.mc_logits, atol=ATOL, rtol=0)


# -- the static KV cache ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["gpt2", "openai-gpt"])
def lm_pair(request, tmp_path_factory):
    """(our LM, the reference LM) for one random checkpoint of each model type."""
    folder = tmp_path_factory.mktemp(f"ref-{request.param}")
    cls = "OpenAIGPTLMHeadModel" if request.param == "openai-gpt" else "GPT2LMHeadModel"
    ref = save_reference(cls, folder, model_type=request.param, seed=31)
    return model.load(str(folder), device="cpu"), ref


def full_logits(ours, ids):
    with torch.no_grad():
        return ours(torch.tensor([ids]))[0]


def step(ours, cache, ids_per_row, slots, starts):
    """One cached forward: row b writes ids_per_row[b] at positions starts[b].. of slot slots[b]."""
    T = len(ids_per_row[0])
    ids = torch.tensor(ids_per_row)
    positions = torch.tensor([[s + t for t in range(T)] for s in starts])
    with torch.no_grad():
        hidden = ours.transformer(ids, positions=positions, cache=cache.view(slots, positions))
        return ours.lm_head(hidden)


def test_cache_prefill_then_decode_equals_full_forward(lm_pair):
    ours, _ = lm_pair
    seq = random_ids((30,), seed=32).tolist()
    expected = full_logits(ours, seq)
    cache = KVCache(ours.config, slots=2)
    with torch.no_grad():
        cache.k.normal_()  # stale garbage in the buffers must never be attended to
        cache.v.normal_()
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    got = [step(ours, cache, [seq[:12]], [1], [0])[0]]
    for t in range(12, 30):
        got.append(step(ours, cache, [[seq[t]]], [1], [t])[0])
        assert cache.k.data_ptr() == k_ptr and cache.v.data_ptr() == v_ptr
    got = torch.cat(got)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_cache_rows_in_non_contiguous_slots(lm_pair):
    """Two sequences of different lengths in slots [2, 0] of a 3-slot cache, decoded together."""
    ours, _ = lm_pair
    a = random_ids((20,), seed=33).tolist()
    b = random_ids((20,), seed=34).tolist()
    cache = KVCache(ours.config, slots=3)
    with torch.no_grad():
        cache.k.normal_()
        cache.v.normal_()
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    first_a = step(ours, cache, [a[:9]], [2], [0])[0]
    first_b = step(ours, cache, [b[:5]], [0], [0])[0]
    got_a, got_b = [first_a], [first_b]
    for t in range(6):
        out = step(ours, cache, [[a[9 + t]], [b[5 + t]]], [2, 0], [9 + t, 5 + t])
        got_a.append(out[0])
        got_b.append(out[1])
        assert cache.k.data_ptr() == k_ptr and cache.v.data_ptr() == v_ptr
    torch.testing.assert_close(torch.cat(got_a), full_logits(ours, a[:15]), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(got_b), full_logits(ours, b[:11]), atol=ATOL, rtol=0)


def test_cache_prefill_batch_of_two_in_reversed_slots(lm_pair):
    ours, _ = lm_pair
    a = random_ids((10,), seed=35).tolist()
    b = random_ids((10,), seed=36).tolist()
    cache = KVCache(ours.config, slots=3)
    out = step(ours, cache, [a, b], [2, 0], [0, 0])
    torch.testing.assert_close(out[0], full_logits(ours, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], full_logits(ours, b), atol=ATOL, rtol=0)


def test_cache_fork_with_copy_slot(lm_pair):
    ours, _ = lm_pair
    prompt = random_ids((14,), seed=37).tolist()
    x, y = 17, 42
    cache = KVCache(ours.config, slots=3)
    step(ours, cache, [prompt], [0], [0])
    cache.fork(0, 2, len(prompt))
    k_ptr = cache.k.data_ptr()
    out = step(ours, cache, [[x], [y]], [0, 2], [len(prompt)] * 2)
    torch.testing.assert_close(out[0, 0], full_logits(ours, prompt + [x])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, 0], full_logits(ours, prompt + [y])[-1], atol=ATOL, rtol=0)
    # ...and each branch keeps going on its own.
    out = step(ours, cache, [[y], [x]], [0, 2], [len(prompt) + 1] * 2)
    torch.testing.assert_close(out[0, 0], full_logits(ours, prompt + [x, y])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, 0], full_logits(ours, prompt + [y, x])[-1], atol=ATOL, rtol=0)
    assert cache.k.data_ptr() == k_ptr


def test_cache_matches_reference_logits(lm_pair):
    """The cached path against the reference directly, not only against our own full forward."""
    ours, ref = lm_pair
    seq = random_ids((16,), seed=38).tolist()
    cache = KVCache(ours.config, slots=1)
    got = [step(ours, cache, [seq[:6]], [0], [0])[0]]
    for t in range(6, 16):
        got.append(step(ours, cache, [[seq[t]]], [0], [t])[0])
    with torch.no_grad():
        expected = ref(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(torch.cat(got), expected, atol=ATOL, rtol=0)


# -- generation ---------------------------------------------------------------------------------



def reference_generate(ref, prompt, **kw):
    """The reference's continuation, never stopped early (no EOS), so all tokens are compared."""
    ids = torch.tensor([prompt])
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_greedy_40_tokens_match_reference(lm_pair):
    ours, ref = lm_pair
    prompt = random_ids((7,), seed=39).tolist()
    expected = reference_generate(ref, prompt, max_new_tokens=40)
    got = generation.generate(ours, prompt, max_new_tokens=40, greedy=True)
    assert len(expected) == 40 and len(got) == 1
    assert got[0] == expected
    assert len(set(expected)) > 3  # a real continuation, not one token repeated


def test_n_greedy_continuations_fork_one_prefill(lm_pair):
    """Greedy continuation i starts from the i-th most likely token, then continues as the reference would."""
    ours, ref = lm_pair
    prompt = random_ids((6,), seed=43).tolist()
    got = generation.generate(ours, prompt, max_new_tokens=12, n=3, greedy=True)
    assert len(got) == 3 and all(len(c) == 12 for c in got)
    assert got[0] == generation.generate(ours, prompt, max_new_tokens=12, greedy=True)[0]
    with torch.no_grad():
        first = ref(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist()
    assert [c[0] for c in got] == first
    for c in got:
        assert c[1:] == reference_generate(ref, prompt + c[:1], max_new_tokens=11)


def test_greedy_with_repetition_penalty_matches_reference(lm_pair):
    ours, ref = lm_pair
    prompt = random_ids((6,), seed=40).tolist()
    expected = reference_generate(ref, prompt, max_new_tokens=30, repetition_penalty=1.3)
    got = generation.generate(ours, prompt, max_new_tokens=30, greedy=True, repetition_penalty=1.3)
    assert got[0] == expected
    plain = reference_generate(ref, prompt, max_new_tokens=30)
    assert plain != expected  # the penalty changed the reference's choice, so matching it means something


def test_seeded_sampling_is_reproducible(lm_pair):
    ours, _ = lm_pair
    prompt = random_ids((5,), seed=41).tolist()
    kw = dict(max_new_tokens=12, n=3, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    first = generation.generate(ours, prompt, **kw)
    second = generation.generate(ours, prompt, **kw)
    assert first == second
    assert len(first) == 3 and all(len(c) == 12 for c in first)
    assert all(0 <= t < VOCAB for c in first for t in c)
    assert len({tuple(c) for c in first}) > 1  # n continuations are not copies of one
    other = generation.generate(ours, prompt, **{**kw, "seed": 99})
    assert other != first


def test_generation_stops_at_eos(lm_pair):
    ours, _ = lm_pair
    prompt = random_ids((5,), seed=42).tolist()
    free = generation.generate(ours, prompt, max_new_tokens=10, greedy=True)[0]
    eos = free[3]
    stopped = generation.generate(ours, prompt, max_new_tokens=10, greedy=True, eos_token_id=eos)[0]
    cut = free.index(eos) + 1
    assert stopped == free[:cut]


# -- the CPU layouts: one-row products split per thread, oneDNN-packed copies -------------------

@pytest.fixture(scope="module", params=[("gpt2", True, "split"), ("gpt2", True, "packed"), ("gpt2", False, "plain"),
                                        ("gpt2", True, "auto"), ("openai-gpt", True, "split")],
                ids=["gpt2-split", "gpt2-packed", "gpt2-plain", "gpt2-auto", "openai-gpt-split"])
def cpu_pair(request, tmp_path_factory):
    """(our LM prepared for CPU inference, the reference LM): the layout the engine decodes with,
    with each one-row kernel in turn."""
    model_type, pack, one_row = request.param
    folder = tmp_path_factory.mktemp(f"cpu-{model_type}")
    cls = "OpenAIGPTLMHeadModel" if model_type == "openai-gpt" else "GPT2LMHeadModel"
    ref = save_reference(cls, folder, model_type=model_type, seed=41)
    ours = model.load(str(folder), device="cpu")
    prepared = cpu_kernels.prepare_for_cpu(ours, pack=pack, one_row=one_row)
    packed, kernels = prepared["packed"], prepared["one_row_kernels"]
    assert packed == (pack and cpu_kernels.cpu_packing_available())
    assert not any(isinstance(m, (model.network.gpt.Conv1D, model.network.gpt.LMHead)) for m in ours.modules())
    layers = [m for m in ours.modules() if isinstance(m, cpu_kernels.CpuLinear)]
    head = ours.lm_head
    assert layers and isinstance(head, cpu_kernels.CpuLMHead)
    assert all(m.one_row in model.serving.kernel_choice.KERNELS for m in layers + [head])
    # one float copy of each matrix: a packed layer has no plain weight; the packed head sits beside
    # the embedding, whose rows are looked up
    assert all((m.packed is not None) == packed and (m.weight is None) == packed for m in layers)
    assert (head.packed is not None) == packed and head.weight() is ours.transformer.wte.weight
    assert set(kernels) == {"layers", "head"}
    head_kinds = model.serving.kernel_choice.candidates([head])
    if packed:
        assert kernels["layers"] == "packed"
    if one_row == "auto":
        assert kernels["head"] in head_kinds
    else:
        assert kernels["head"] == (one_row if one_row in head_kinds else "plain")
        if not packed:
            assert kernels["layers"] == (one_row if one_row in head_kinds else "plain")
    return ours, ref


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_layout_decode_matches_reference(cpu_pair, threads):
    """Prefill, then one-row steps (the one-row kernel), then a three-row step (packed / BLAS)."""
    ours, ref = cpu_pair
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seqs = [random_ids((14,), seed=42 + i).tolist() for i in range(3)]
        cache = KVCache(ours.config, slots=3)
        got = [[step(ours, cache, [s[:8]], [b], [0])[0]] for b, s in enumerate(seqs)]
        for t in range(8, 12):
            for b, s in enumerate(seqs):
                got[b].append(step(ours, cache, [[s[t]]], [b], [t])[0])
        for t in range(12, 14):
            out = step(ours, cache, [[s[t]] for s in seqs], [0, 1, 2], [t] * 3)
            for b in range(3):
                got[b].append(out[b])
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        expected = ref(torch.tensor(seqs)).logits
    for b in range(3):
        torch.testing.assert_close(torch.cat(got[b]), expected[b], atol=ATOL, rtol=0)


def test_cpu_layout_greedy_40_tokens_match_reference(cpu_pair):
    ours, ref = cpu_pair
    prompt = random_ids((7,), seed=45).tolist()
    expected = reference_generate(ref, prompt, max_new_tokens=40)
    assert generation.generate(ours, prompt, max_new_tokens=40, greedy=True) == [expected]


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("I,O", [(48, 211), (48, 144), (45, 7), (7, 5), (1, 3)])
def test_one_row_products_equal_matmul(threads, I, O):
    """Every cut (thread counts that do and do not divide the sizes, an odd vocabulary) gives x @ W."""
    gen = torch.Generator().manual_seed(I * O + threads)
    x, w = torch.randn(1, I, generator=gen), torch.randn(I, O, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split_in = cpu_kernels.one_row_matmul(x, w)
        split_out = cpu_kernels.one_row_matmul_t(x, w.t().contiguous())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(split_in, x @ w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_out, x @ w, atol=1e-5, rtol=1e-5)


# -- shared prompts: the rows forked from one prompt read it once -------------------------------

def test_shared_prefix_attention_equals_per_row_reads(lm_pair, monkeypatch):
    """Three rows forked from one prompt (one starts later, as a replacement row does) plus an
    unrelated row: reading the prompt once for the group gives the per-row logits."""
    ours, _ = lm_pair
    monkeypatch.setattr(kv_cache, "SHARED_PREFIX_MIN", 4)
    prompt = random_ids((20,), seed=50).tolist()
    other = random_ids((9,), seed=51).tolist()
    own = [random_ids((6,), seed=52 + i).tolist() for i in range(3)]
    cache = KVCache(ours.config, slots=5)
    with torch.no_grad():
        cache.k.normal_()  # stale garbage past each row's end must never count
        cache.v.normal_()
    step(ours, cache, [prompt], [4], [0])
    for slot in (1, 2):
        cache.fork(4, slot, len(prompt))
    step(ours, cache, [other], [0], [0])
    ends = [6, 6, 3]  # the third row has decoded fewer tokens of its own
    for b, slot in enumerate((4, 1, 2)):
        if ends[b] > 1:
            step(ours, cache, [own[b][:ends[b] - 1]], [slot], [len(prompt)])
    ids = torch.tensor([[own[0][5]], [other[0]], [own[1][5]], [own[2][2]]])
    positions = torch.tensor([[len(prompt) + 5], [len(other)], [len(prompt) + 5], [len(prompt) + 2]])
    slots = [4, 0, 1, 2]
    before = (cache.k.clone(), cache.v.clone())
    calls = []
    inner = kv_cache.CacheView._attend_shared
    monkeypatch.setattr(kv_cache.CacheView, "_attend_shared",
                        lambda self, *a, **kw: calls.append(a[2].shape[0]) or inner(self, *a, **kw))
    with torch.no_grad():
        shared = ours.lm_head(ours.transformer(ids, positions=positions,
                                               cache=cache.view(slots, positions, shared=[([0, 2, 3], len(prompt))])))
        cache.k.copy_(before[0])
        cache.v.copy_(before[1])
        alone = ours.lm_head(ours.transformer(ids, positions=positions, cache=cache.view(slots, positions)))
    assert calls == [3] * ours.config.n_layer  # the group's three rows, once a layer
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    expected = full_logits(ours, prompt + own[2][:3])[-1]
    torch.testing.assert_close(shared[3, -1], expected, atol=ATOL, rtol=0)


def test_shared_prefix_needs_a_row_past_it(lm_pair, monkeypatch):
    ours, _ = lm_pair
    monkeypatch.setattr(kv_cache, "SHARED_PREFIX_MIN", 4)
    cache = KVCache(ours.config, slots=2)
    positions = torch.tensor([[10], [10]])
    with pytest.raises(ValueError):
        kv_cache.CacheView(cache, [0, 1], positions, shared=[([0, 1], 11)])
    view = kv_cache.CacheView(cache, [0, 1], positions, shared=[([0, 1], 3)])  # too short to share
    assert view.shared == [] and view.solo == [0, 1]
