"""`wwt make-tiny-model`: a tiny checkpoint in the Hub's exact layout that the reference loads too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model
from app.cli import main
from model.network.tokenizer import load_tokenizer_folder

from model_support import max_diff

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli_gpt2(tmp_path_factory):
    """Made through the real entry point, in a fresh interpreter, as a user runs it."""
    out = tmp_path_factory.mktemp("cli") / "tiny-gpt2"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "app.cli", "make-tiny-model", str(out), "--seed", "7"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"wrote a tiny random gpt2 checkpoint to {out}"]  # one line, no blank ones
    return out


def test_layout(cli_gpt2):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cli_gpt2.iterdir()}
    modes = {p.name: p.stat().st_mode & 0o777 for p in cli_gpt2.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights are as readable as the config
    assert not list(cli_gpt2.glob("*.bin"))
    config = json.loads((cli_gpt2 / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    d, L = config["n_embd"], config["n_layer"]
    tensors = load_file(str(cli_gpt2 / "model.safetensors"))
    # The Hub's key names, Conv1D weights [in, out].
    assert tuple(tensors["h.0.attn.c_attn.weight"].shape) == (d, 3 * d)
    assert tuple(tensors["h.0.mlp.c_fc.weight"].shape) == (d, 4 * d)
    assert tuple(tensors["h.0.mlp.c_proj.weight"].shape) == (4 * d, d)
    assert tuple(tensors["wte.weight"].shape) == (config["vocab_size"], d)
    assert tuple(tensors["wpe.weight"].shape) == (config["n_positions"], d)
    assert f"h.{L - 1}.ln_2.bias" in tensors and "ln_f.weight" in tensors
    assert not any(k.startswith("lm_head") for k in tensors)  # tied to wte
    tok = load_tokenizer_folder(cli_gpt2)
    assert tok.vocab_size == config["vocab_size"]
    assert tok.eos_token_id == config["eos_token_id"]


def test_same_seed_same_checkpoint(cli_gpt2, tmp_path):
    assert main(["make-tiny-model", str(tmp_path / "again"), "--seed", "7"]) == 0
    a = load_file(str(cli_gpt2 / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["make-tiny-model", str(tmp_path / "other"), "--seed", "8"]) == 0
    c = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert max_diff(a["h.0.attn.c_attn.weight"], c["h.0.attn.c_attn.weight"]) > 0.01


def test_reference_loads_it_and_agrees(cli_gpt2):
    import transformers

    ref = transformers.GPT2LMHeadModel.from_pretrained(str(cli_gpt2)).eval()
    ours = model.load(str(cli_gpt2), device="cpu")
    tok = load_tokenizer_folder(cli_gpt2)
    ids = torch.tensor([tok.encode("The model writes a few words of text.")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
    ref_tok = transformers.GPT2TokenizerFast.from_pretrained(str(cli_gpt2))
    assert ref_tok.encode("The model writes", add_special_tokens=False) == tok.encode("The model writes")


def test_openai_gpt(tmp_path):
    import transformers

    out = tmp_path / "tiny-openai"
    assert main(["make-tiny-model", str(out), "--model-type", "openai-gpt", "--seed", "3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "openai-gpt"
    tensors = load_file(str(out / "model.safetensors"))
    assert "tokens_embed.weight" in tensors and "positions_embed.weight" in tensors
    assert "ln_f.weight" not in tensors  # post-LayerNorm: no final norm
    d = config["n_embd"]
    assert tuple(tensors["h.0.attn.c_attn.weight"].shape) == (d, 3 * d)

    ref = transformers.OpenAIGPTLMHeadModel.from_pretrained(str(out)).eval()
    ours = model.load(str(out), device="cpu")
    ids = torch.tensor([load_tokenizer_folder(out).encode("a few words of text")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_extra_heads(tmp_path):
    import transformers

    out = tmp_path / "heads"
    assert main(["make-tiny-model", str(out), "--heads", "sequence-classification,question-answering"]) == 0
    tensors = load_file(str(out / "model.safetensors"))
    assert "score.weight" in tensors and "qa_outputs.weight" in tensors
    assert "transformer.h.0.attn.c_attn.weight" in tensors
    ids = torch.tensor([[5, 9, 2, 7]])
    ref = transformers.GPT2ForSequenceClassification.from_pretrained(str(out)).eval()
    ours = model.load(str(out), head="sequence-classification", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
    assert ref.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    ref = transformers.GPT2ForQuestionAnswering.from_pretrained(str(out)).eval()
    ours = model.load(str(out), head="question-answering", device="cpu")
    with torch.no_grad():
        start, end = ours(ids)
        expected = ref(ids)
    torch.testing.assert_close(start, expected.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(end, expected.end_logits, atol=1e-4, rtol=0)
