"""scripts/gpu_check.sh without a GPU (GPU_CHECK_DRY=1 forces that path on a machine with one): it
says there is no CUDA device and exits 2, after selecting the test modules that use the cuda marker
and import here, collecting their CUDA tests, and running the sizes bench once on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def dry_run(script: Path, out: Path, **env):
    return subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GPU_CHECK_DRY": "1", **env})


def test_without_a_device_it_checks_the_plumbing_and_exits_2(tmp_path):
    run = dry_run(SCRIPT, tmp_path / "out")
    assert run.returncode == 2, (run.stdout[-3000:], run.stderr[-3000:])
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert "no CUDA device" in summary and "no CUDA device" in run.stdout
    selected = [line.split()[1] for line in (out / "selection.txt").read_text().splitlines()
                if line.startswith("selected ")]
    assert {"tests/test_quantize.py", "tests/test_fixed_shape_decode.py", "tests/test_bench_sizes.py"} <= set(selected)
    collected = (out / "collect.txt").read_text()
    assert "test_quantize.py::test_cuda_precisions[int8]" in collected
    assert "test_fixed_shape_decode.py::test_the_captured_cuda_graph_suggests_what_the_ordinary_step_does" in collected
    assert "test_bench_sizes.py::test_sizes_report_on_cuda" in collected
    assert "test_bench_sizes.py::test_random_checkpoints" not in collected  # -m cuda: only the CUDA tests
    assert "bench imports: no gradio" in (out / "env.txt").read_text()
    row, = json.loads((out / "sizes-plumbing.json").read_text())["rows"]
    assert row["status"] == "ok" and row["decode_step_ms"] > 0


def test_a_cuda_test_module_whose_imports_fail_is_left_out(tmp_path):
    """A copy of the script in a checkout whose tests import something this Python lacks: that module
    is left out with the reason, the others are selected."""
    fake = tmp_path / "checkout"
    (fake / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, fake / "scripts" / "gpu_check.sh")
    (fake / "tests").mkdir()
    (fake / "tests" / "conftest.py").write_text("import json\n")
    marked = "import pytest\n\n@pytest.mark.cuda\ndef test_it():\n    pass\n"
    (fake / "tests" / "test_here.py").write_text("import os\n" + marked)
    (fake / "tests" / "test_lacking.py").write_text("import a_module_this_python_lacks\n" + marked)
    (fake / "tests" / "test_unmarked.py").write_text("def test_it():\n    pass\n")
    # the script puts its checkout first on PYTHONPATH; the project's code comes from this one
    run = dry_run(fake / "scripts" / "gpu_check.sh", tmp_path / "out", PYTHONPATH=str(ROOT))
    assert run.returncode == 2, (run.stdout[-3000:], run.stderr[-3000:])
    selection = (tmp_path / "out" / "selection.txt").read_text().splitlines()
    assert selection == ["selected tests/test_here.py",
                         "left out tests/test_lacking.py: a_module_this_python_lacks: "
                         "ModuleNotFoundError: No module named 'a_module_this_python_lacks'"]
    assert "1 test collected" in (tmp_path / "out" / "collect.txt").read_text()
