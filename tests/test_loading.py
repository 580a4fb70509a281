"""Loading checkpoints: the Hub's key layouts, dtypes, the tiny fixtures, and one clear error per problem."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from model.network.config import GPTConfig
from model.errors import CheckpointError, UnknownModel, WWTError
from model.network.known import KNOWN_SHAPES

from model_support import max_diff, random_ids, reference_config, save_reference

ATOL = 1e-4


@pytest.fixture(scope="module")
def gpt2_ref(tmp_path_factory):
    """(folder, reference) of a random GPT2LMHeadModel saved with the `transformer.` prefix."""
    folder = tmp_path_factory.mktemp("gpt2-ref")
    return folder, save_reference("GPT2LMHeadModel", folder, seed=51)


@pytest.fixture(scope="module")
def openai_ref(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai-ref")
    return folder, save_reference("OpenAIGPTLMHeadModel", folder, model_type="openai-gpt", seed=52)


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy checkpoint `src` to `dst`, passing its tensors through `edit(dict) -> dict`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = edit(dict(load_file(str(src / "model.safetensors"))))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def strip_prefix(tensors: dict) -> dict:
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def assert_matches(folder: Path, ref, seed=53):
    ours = model.load(str(folder), device="cpu")
    ids = random_ids((2, 12), seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=ATOL, rtol=0)


def write_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


# -- the Hub's layouts --------------------------------------------------------------------------

def test_gpt2_with_transformer_prefix(gpt2_ref):
    folder, ref = gpt2_ref
    assert any(k.startswith("transformer.h.0.") for k in load_file(str(folder / "model.safetensors")))
    assert_matches(folder, ref)


def test_gpt2_without_prefix_and_with_old_attention_buffers(gpt2_ref, tmp_path):
    """The layout of the Hub's gpt2 repo: bare keys plus the causal-mask buffers old versions saved."""
    folder, ref = gpt2_ref
    P = ref.config.n_positions

    def edit(t):
        t = strip_prefix(t)
        for i in range(ref.config.n_layer):
            t[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
            t[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return t

    dst = rewrite(folder, tmp_path / "bare", edit)
    keys = load_file(str(dst / "model.safetensors"))
    assert "h.0.attn.c_attn.weight" in keys and "h.1.attn.masked_bias" in keys
    assert not any(k.startswith("transformer.") for k in keys)
    assert_matches(dst, ref)


def test_conv1d_weights_are_stored_in_out(gpt2_ref):
    folder, ref = gpt2_ref
    ours = model.load(str(folder), device="cpu")
    d = ref.config.n_embd
    assert tuple(ours.transformer.h[0].attn.c_attn.weight.shape) == (d, 3 * d)
    torch.testing.assert_close(ours.transformer.h[0].mlp.c_fc.weight, ref.transformer.h[0].mlp.c_fc.weight)


def test_untied_lm_head(tmp_path):
    ref = save_reference("GPT2LMHeadModel", tmp_path / "src", seed=54, tie_word_embeddings=False)
    keys = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert "lm_head.weight" in keys
    assert max_diff(keys["lm_head.weight"], keys["transformer.wte.weight"]) > 0.1
    assert_matches(tmp_path / "src", ref)


def test_openai_gpt_keys(openai_ref, tmp_path):
    folder, ref = openai_ref
    keys = load_file(str(folder / "model.safetensors"))
    assert "transformer.tokens_embed.weight" in keys and "transformer.positions_embed.weight" in keys
    assert_matches(folder, ref)
    bare = rewrite(folder, tmp_path / "bare", strip_prefix)
    assert "tokens_embed.weight" in load_file(str(bare / "model.safetensors"))
    assert_matches(bare, ref)


def test_old_openai_gpt_position_ids_buffer_ignored(openai_ref, tmp_path):
    """transformers 4.x saved OpenAIGPTModel's position_ids buffer with the weights."""
    folder, ref = openai_ref
    P = ref.config.n_positions
    dst = rewrite(folder, tmp_path / "old", lambda t: {**t, "transformer.position_ids": torch.arange(P)[None]})
    assert_matches(dst, ref)
    bare = rewrite(dst, tmp_path / "old-bare", strip_prefix)
    assert "position_ids" in load_file(str(bare / "model.safetensors"))
    assert_matches(bare, ref)


def test_sharded_checkpoint(gpt2_ref, tmp_path):
    """Large models come as model-0000N-of-0000M.safetensors plus an index."""
    folder, ref = gpt2_ref
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_matches(dst, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(gpt2_ref, dtype):
    folder, ref = gpt2_ref
    ours = model.load(str(folder), dtype=dtype, device="cpu")
    assert all(p.dtype == dtype for p in ours.parameters())
    ids = random_ids((1, 10), seed=55)
    with torch.no_grad():
        got = ours(ids)
        expected = ref(ids).logits
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    # Half precision rounds, but it is the same network: the same logits to a coarse tolerance.
    assert max_diff(got, expected) < 0.25 * float(expected.abs().max())
    assert (got.float().argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


# -- the tiny checkpoints the other tests use ---------------------------------------------------

def test_tiny_fixtures_load(tiny_gpt2, tiny_gpt2_heads, tiny_openai):
    lm = model.load(str(tiny_gpt2), device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert lm(ids).shape == (1, 4, lm.config.vocab_size)

    cls = model.load(str(tiny_gpt2_heads), head="sequence-classification", device="cpu")
    assert [cls.config.id2label[i] for i in range(cls.config.num_labels)] == ["NEGATIVE", "POSITIVE"]
    qa = model.load(str(tiny_gpt2_heads), head="question-answering", device="cpu")
    with torch.no_grad():
        assert cls(ids).shape == (1, 2)
        start, end = qa(ids)
    assert start.shape == end.shape == (1, 4)
    # Both heads share the body the LM head of the same checkpoint uses.
    lm_heads = model.load(str(tiny_gpt2_heads), device="cpu")
    torch.testing.assert_close(lm_heads.transformer.wte.weight, cls.transformer.wte.weight)

    gpt1 = model.load(str(tiny_openai), device="cpu")
    assert gpt1.config.model_type == "openai-gpt" and gpt1.transformer.ln_f is None
    with torch.no_grad():
        assert gpt1(ids).shape == (1, 4, gpt1.config.vocab_size)


def test_tiny_checkpoint_without_a_head_it_is_asked_for(tiny_gpt2):
    with pytest.raises(CheckpointError) as e:
        model.load(str(tiny_gpt2), head="question-answering", device="cpu")
    assert "qa_outputs" in e.value.message


# -- one clear error per problem ----------------------------------------------------------------

def test_missing_tensor_is_named(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "missing" in e.value.message and "h.1.mlp.c_fc.bias" in e.value.message


@pytest.mark.parametrize("extra", ["transformer.h.0.attn.q_proj.weight", "transformer.extra.weight", "rogue.weight"])
def test_unexpected_tensor_is_named(gpt2_ref, tmp_path, extra):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: {**t, extra: torch.zeros(3)})
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "unexpected" in e.value.message
    assert extra.removeprefix("transformer.") in e.value.message


def test_shape_mismatch_is_named(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: {**t, "transformer.h.2.attn.c_proj.weight": torch.zeros(48, 40)})
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "h.2.attn.c_proj.weight" in e.value.message and "shape" in e.value.message


def test_config_that_disagrees_with_the_weights(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: t)
    write_config(dst, n_positions=128)
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "wpe" in e.value.message


def test_unknown_model_type(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: t)
    write_config(dst, model_type="llama")
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "llama" in e.value.message and "model_type" in e.value.message


@pytest.mark.parametrize("field,value", [("activation_function", "swoosh"), ("summary_activation", "swoosh")])
def test_unknown_activation(gpt2_ref, tmp_path, field, value):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: t)
    write_config(dst, **{field: value})
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert field in e.value.message and value in e.value.message


def test_unknown_openai_afn(openai_ref, tmp_path):
    folder, _ = openai_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: t)
    write_config(dst, afn="swoosh")
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "afn" in e.value.message and "swoosh" in e.value.message


def test_heads_that_do_not_divide_the_width(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: t)
    write_config(dst, n_head=5)
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "n_head" in e.value.message


def test_only_pickled_weights_are_refused(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = tmp_path / "pickled"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    marker = tmp_path / "unpickled"
    # Unpickling this file would run code; the loader must never do it.
    import pickle

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (dst / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    message = e.value.message
    assert "pickle" in message and "safetensors" in message and "pytorch_model.bin" in message
    assert not marker.exists()


def test_no_config_json(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = tmp_path / "noconfig"
    dst.mkdir()
    shutil.copy(folder / "model.safetensors", dst / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "config.json" in e.value.message


def test_broken_config_json(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = rewrite(folder, tmp_path / "c", lambda t: t)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "config.json" in e.value.message


def test_no_weights_at_all(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = tmp_path / "noweights"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "safetensors" in e.value.message


def test_corrupt_safetensors(gpt2_ref, tmp_path):
    folder, _ = gpt2_ref
    dst = tmp_path / "corrupt"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError) as e:
        model.load(str(dst), device="cpu")
    assert "model.safetensors" in e.value.message


@pytest.mark.parametrize("path", ["/nonexistent/checkpoint/dir", "./no-such-folder", "~/no-such-folder-wwt"])
def test_missing_local_folder(path):
    """The operator (log, command line) reads the path; a visitor's message names none."""
    from model.errors import OPERATOR, VISITOR

    with pytest.raises(UnknownModel) as e:
        model.load(path, device="cpu")
    assert path in e.value.text_for(OPERATOR) and path not in e.value.text_for(VISITOR)


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection."""
    attempts = []

    def refuse(self, address, *a, **kw):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **kw: refuse(None, address))
    return attempts


@pytest.mark.parametrize("name", ["gpt2", "no-such-model-wwt", "someone/no-such-repo"])
def test_offline_name_not_in_cache_fails_fast(monkeypatch, tmp_path, no_network, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WWTError) as e:
        model.load(name, device="cpu", cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(e.value, (CheckpointError, UnknownModel))
    assert name in e.value.message
    assert "offline" in e.value.message or "cache" in e.value.message
    assert no_network == []


def test_invalid_name(no_network):
    with pytest.raises(UnknownModel) as e:
        model.load("not a model name!", device="cpu")
    assert "not a model name!" in e.value.message
    assert no_network == []


def test_unknown_head(gpt2_ref):
    folder, _ = gpt2_ref
    with pytest.raises((ValueError, WWTError)) as e:
        model.load(str(folder), head="summarisation", device="cpu")
    assert "summarisation" in str(e.value)


# -- sizes from the config alone ----------------------------------------------------------------

@pytest.mark.parametrize("model_type,overrides", [
    ("gpt2", {}),
    ("gpt2", {"n_inner": 72, "n_layer": 2}),
    ("gpt2", {"vocab_size": 300, "n_positions": 32, "n_embd": 64, "n_head": 8}),
    ("openai-gpt", {}),
])
def test_parameter_count_matches_reference(tmp_path, model_type, overrides):
    import transformers

    cls = transformers.OpenAIGPTLMHeadModel if model_type == "openai-gpt" else transformers.GPT2LMHeadModel
    ref = cls(reference_config(model_type, **overrides))
    expected = sum(p.numel() for p in ref.parameters())  # the tied LM head is one tensor
    ref.save_pretrained(tmp_path)
    config = GPTConfig.from_file(tmp_path / "config.json")
    assert config.parameter_count() == expected
    ours = model.load(str(tmp_path), device="cpu")
    assert sum(p.numel() for p in ours.parameters()) == expected


def test_known_gpt2_sizes():
    """The published sizes of the Hub's GPT-2 checkpoints, from their configs alone."""
    counts = {name: GPTConfig.from_dict({"model_type": "openai-gpt" if name == "openai-gpt" else "gpt2", **shape})
              .parameter_count() for name, shape in KNOWN_SHAPES.items()}
    assert counts["gpt2"] == 124_439_808
    assert counts["gpt2-medium"] == 354_823_168
    assert counts["distilgpt2"] < counts["gpt2"] < counts["gpt2-medium"] < counts["gpt2-large"] < counts["gpt2-xl"]
    assert counts["openai-gpt"] == 116_534_784


# -- the precision a model loads in when none is named -------------------------------------------

def test_default_precision_fits_each_size_on_a_cpu():
    import torch

    from model.network.config import GPTConfig
    from model.network.known import KNOWN_SHAPES
    from model.serving.loading import default_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    chosen = {name: default_precision(GPTConfig(**KNOWN_SHAPES[name]).parameter_count(), cpu)
              for name in ("distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert chosen == {"distilgpt2": "float32", "gpt2": "float32", "gpt2-medium": "float32",
                      "gpt2-large": "int8", "gpt2-xl": "int8"}
    assert default_precision(10**10, cuda) == "float16" and default_precision(None, cpu) == "float32"


def test_an_engine_takes_the_default_precision_unless_one_is_named(tiny_gpt2, monkeypatch):
    """The rule reads the checkpoint's size from its config.json; a spec's or a caller's precision wins."""
    from model import Engine
    from model.serving import loading

    monkeypatch.setattr(loading, "CPU_INT8_FROM_PARAMETERS", 1)  # the tiny model counts as large
    engines = [Engine.from_pretrained(str(tiny_gpt2), device="cpu", slots=2),
               Engine.from_pretrained(f"{tiny_gpt2}@float32", device="cpu", slots=2),
               Engine.from_pretrained(str(tiny_gpt2), device="cpu", dtype="int4", slots=2)]
    try:
        assert [e.precision for e in engines] == ["int8", "float32", "int4"]
        assert engines[0].stats()["precision"] == "int8"
    finally:
        for engine in engines:
            engine.close()


def test_an_unloaded_known_model_shows_the_precision_it_will_load_in():
    from app.backends.local import LocalBackend

    backend = LocalBackend(["gpt2", "gpt2-xl", "xl8=gpt2-xl@int4"], device="cpu")
    try:
        assert [backend.model_info(m)["precision"] for m in ("gpt2", "gpt2-xl", "xl8")] == ["float32", "int8", "int4"]
        assert not backend.loaded()  # nothing was downloaded or loaded to say so
    finally:
        backend.close()
