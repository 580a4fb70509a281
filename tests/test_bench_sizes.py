"""`wwt bench --sizes` end to end on a tiny shape (the real sizes take minutes): every field of every
row is there and sane, the table is printed, and a row whose process dies or cannot load is
reported while the run goes on. Times are never compared with a figure, only checked positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.bench.sizes import COLUMNS, format_report
from app.bench.sizes_measure import step_read_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny:2,64,4,1000"  # 2 layers, 64 wide, 4 heads, vocabulary 1000, 1024 positions
POSITIVE = ("load_s", "memory_at_load_mb", "weights_and_cache_mb", "memory_ratio", "weights_mb", "kv_cache_mb",
            "step_read_mb", "read_bandwidth_gb_s", "bound_ms", "decode_step_ms", "decode_x_bound", "keystroke_ms",
            "keystroke_x_bound", "first_partial_ms", "first_partial_x_bound", "kv_read_decode_mb")


def wwt_bench(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "app.cli", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_measured_row(row: dict, device: str) -> None:
    assert row["status"] == "ok", row
    for name in POSITIVE:
        assert isinstance(row[name], (int, float)) and row[name] > 0, (name, row[name])
    assert row["first_partial_ms"] <= row["keystroke_ms"]  # the first update comes before the answer
    assert row["step_read_mb"] < row["weights_mb"]  # less the position embedding at least
    assert row["rows"] >= 3 and row["kv_tokens"] >= 4 * 256  # 3 suggestions and the document's prefix
    assert row["keystroke_tokens_reused"] > 800  # the 900-token document was reused, as typed on
    assert row["device"].startswith(device) and row["device_name"]
    assert "precision" in row["engine"] and all(any(w in k for w in ("kernel", "dtype", "precision"))
                                                for k in row["engine"])


def test_sizes_report_measures_each_precision_and_goes_on_past_a_killed_process(tmp_path):
    """The first precision's process is SIGKILLed after loading (as the out-of-memory killer would):
    its row says so, the next precision is measured, the checkpoint is kept in --cache-dir, and the
    exit status says a row failed."""
    run = wwt_bench("--sizes", "--shape", TINY, "--dtype", "bfloat16,float32", "--simulate-crash", "bfloat16",
                    "--quick", "--json", "--cache-dir", str(tmp_path))
    assert run.returncode == 1, run.stderr[-3000:]
    report = json.loads(run.stdout)
    crashed, measured = report["rows"]
    assert (crashed["size"], crashed["precision"], crashed["status"]) == ("tiny", "bfloat16", "failed")
    assert "SIGKILL" in crashed["error"] and "out of memory" in crashed["error"]
    assert (measured["size"], measured["precision"]) == ("tiny", "float32")
    check_measured_row(measured, "cpu")
    assert measured["memory_source"] in ("RssAnon", "VmRSS", "peak RSS") and measured["threads"] == 2
    machine = report["machine"]
    assert machine["cpu"] and set(machine["cpu_flags"]) == {"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                                           "amx_bf16"}
    assert (tmp_path / "tiny-random-seed0" / "model.safetensors").is_file()  # kept for the next run

    table = format_report(report)
    assert "| " + " | ".join(COLUMNS) + " |" in table
    assert "| tiny | bfloat16 | failed: killed by SIGKILL" in table
    assert "| tiny | float32 | " in table and "one_row_kernels" in table and machine["cpu"] in table


def test_a_checkpoint_that_cannot_load_is_a_failed_row_in_the_printed_table(tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64,
                                                    "n_head": 4, "vocab_size": 1000}))
    run = wwt_bench("--sizes", "--checkpoint", str(folder), "--dtype", "float32", "--quick")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "| size | precision | load s |" in run.stdout
    assert "| no-weights | float32 | failed: CheckpointError: no model.safetensors" in run.stdout, run.stdout


def test_unknown_sizes_and_precisions_are_refused_before_anything_runs():
    for args, message in ((("--sizes", "gpt3"), "unknown size gpt3"),
                          (("--sizes", "gpt2", "--dtype", "int3"), "unknown precision int3")):
        run = wwt_bench(*args, timeout=120)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "[sizes]" not in run.stderr  # no checkpoint written, no process started


def test_random_checkpoints_have_the_hub_layout_and_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    from app.bench.sizes_checkpoint import random_checkpoint
    from model import Engine

    shape = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
    a = load_file(str(random_checkpoint(tmp_path / "a", "t", shape) / "model.safetensors"))
    b = load_file(str(random_checkpoint(tmp_path / "b", "t", shape) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["wte.weight"].shape == (1000, 64) and a["h.1.attn.c_attn.weight"].shape == (64, 192)
    assert torch.equal(a["h.0.ln_1.weight"], torch.ones(64)) and not a["h.0.mlp.c_fc.bias"].any()
    assert 0.015 < float(a["h.0.mlp.c_proj.weight"].std()) < 0.025
    config = json.loads((tmp_path / "a" / "t-random-seed0" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    engine = Engine.from_pretrained(str(tmp_path / "a" / "t-random-seed0"), device="cpu", slots=4)
    try:  # no end-of-text token: a request decodes its whole budget
        assert all(len(s.token_ids) == 6 for s in suggest(engine, "Once upon a time", 6))
    finally:
        engine.close()


def suggest(engine, text, tokens):
    from app.bench.speed import completion_request

    return engine.complete(completion_request(text, 2, tokens, False, 0)).suggestions


@pytest.mark.parametrize("precision", ["float32", "int8", "int4"])
def test_a_step_reads_every_weight_once_but_the_position_table(tiny_gpt2, precision):
    """Tied embedding / LM head counted once; the position embedding left out (one row a step); for
    int4, and int8 with the dynamic kernel, the copy of the tied matrix that serves only row lookups
    left out too."""
    from model.serving.loading import load_with_heads_at
    from model.serving.quantize import weight_bytes

    lm, _, _ = load_with_heads_at(Path(tiny_gpt2), precision, "cpu")
    wpe = lm.transformer.wpe.weight
    everything_but_positions = weight_bytes(lm) - wpe.numel() * wpe.element_size()
    read = step_read_bytes(lm)
    if precision == "int4":
        vocab, width = lm.config.vocab_size, lm.config.n_embd
        assert everything_but_positions - vocab * width // 2 - 16 * width <= read <= everything_but_positions
    elif precision == "int8" and lm.transformer.wte.matrix.dynamic is not None:
        assert read == everything_but_positions - lm.transformer.wte.matrix.q.numel()
    else:
        assert read == everything_but_positions


def test_an_untied_head_is_read_instead_of_the_embedding(tmp_path, tiny_gpt2):
    import shutil

    from safetensors.torch import load_file, save_file

    from model.serving.loading import load_with_heads_at
    from model.serving.quantize import weight_bytes

    folder = tmp_path / "untied"
    shutil.copytree(tiny_gpt2, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "lm_head.weight": state["wte.weight"] * 2}, str(folder / "model.safetensors"))
    lm, _, _ = load_with_heads_at(folder, "float32", "cpu")
    wte, wpe = lm.transformer.wte.weight, lm.transformer.wpe.weight
    assert step_read_bytes(lm) == weight_bytes(lm) - (wte.numel() + wpe.numel()) * 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sizes_report_on_cuda(tmp_path):
    """The GPU path: memory from the CUDA allocator, the bound from a device read, every row measured."""
    run = wwt_bench("--sizes", "--shape", TINY, "--dtype", "float16,int8", "--device", "cuda", "--quick", "--json",
                    "--cache-dir", str(tmp_path))
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    for row in json.loads(run.stdout)["rows"]:
        check_measured_row(row, "cuda")
        assert row["memory_source"] == "cuda max_memory_allocated"
