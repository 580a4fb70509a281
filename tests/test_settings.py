"""The one settings registry (model/settings.py): docs/configuration.md is generated from it and
lists exactly its variables, nothing else reads them from the environment, and a value that cannot
be used is a readable error."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model import settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
NAME = re.compile(r"`((?:WWT|HF)_[A-Z0-9_]+|SPACE_ID)`")
PLATFORM = {"SPACE_ID"}  # set by Hugging Face Spaces itself, read by the app
ANY_WWT = re.compile(r"\bWWT_[A-Z0-9_]+")
REGENERATE = "run `python -m model.settings > docs/configuration.md` and commit the result"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def setting_rows(text: str) -> dict[str, tuple[str, str]]:
    """name -> (the row's default cell, the `## ` heading above it), from every table whose first
    column is `variable`."""
    rows: dict[str, tuple[str, str]] = {}
    in_table, heading = False, ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if not in_table and cells[0] == "variable":
            in_table = True
            continue
        if in_table and not set(cells[0]) <= set("-: "):
            names = NAME.findall(cells[0])
            assert names, f"a settings table row names no variable: {line}"
            for name in names:
                assert name not in rows, f"{name} is listed twice"
                rows[name] = (cells[1] if len(cells) > 1 else "", heading)
    return rows


def test_the_configuration_page_is_what_the_registry_generates():
    assert CONFIGURATION.exists(), f"docs/configuration.md is missing: {REGENERATE}"
    page = CONFIGURATION.read_text(encoding="utf-8")
    assert page == settings.markdown(), f"docs/configuration.md is out of date with model/settings.py: {REGENERATE}"


def test_the_generator_runs_as_a_module_and_prints_exactly_the_page():
    out = subprocess.run([sys.executable, "-m", "model.settings"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout == settings.markdown()
    first = out.stdout.splitlines()[0]
    assert "python -m model.settings > docs/configuration.md" in first, "the page's first line says how it is made"


def test_the_generated_tables_list_exactly_the_registry_with_defaults_by_group():
    rows = setting_rows(settings.markdown())
    registry = set(settings.SETTINGS)
    assert sorted(registry - set(rows)) == [], "registered but missing from the generated tables"
    assert sorted(set(rows) - registry) == [], "in the generated tables but not registered"
    headings = {}
    for name, setting in settings.SETTINGS.items():
        default, heading = rows[name]
        if setting.default:  # empty defaults are chosen at run time and described in words
            assert default.replace("`", "") == setting.default, (name, setting.default, default)
        else:
            assert default == "*(empty)*", (name, default)
        headings.setdefault(setting.group, set()).add(heading)
    # each group is one section of its own
    assert all(len(h) == 1 for h in headings.values()), headings
    assert len({h for hs in headings.values() for h in hs}) == len(headings), headings
    assert set(headings) == {"app", "queue", "engine", "hub"}


def test_no_table_in_the_readme_or_the_docs_names_an_unregistered_variable():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert CONFIGURATION in pages
    for page in pages:
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("|"):
                unknown = [n for n in ANY_WWT.findall(line) if n not in settings.SETTINGS]
                assert not unknown, f"{unknown} in a table of {page.name} is not in model/settings.py: {line}"
    assert "docs/configuration.md" in (ROOT / "README.md").read_text(encoding="utf-8"), \
        "the README links the settings page"


def test_every_setting_has_a_meaning_and_a_group():
    for name, setting in settings.SETTINGS.items():
        assert setting.name == name and (name.startswith(("WWT_", "HF_")) or name in PLATFORM)
        assert len(setting.meaning) > 20 and setting.group in ("app", "queue", "engine", "hub")


def _environment_reads(path: Path) -> list[str]:
    """WWT_* names this source file reads from the environment (os.environ / os.getenv / environ)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        target = None
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            text = ast.unparse(f)
            if text.endswith(("environ.get", "environ.setdefault", "environ.pop", "getenv")):
                target = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
            target = node.slice
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if any(ast.unparse(c).endswith("environ") for c in node.comparators):
                target = node.left
        if target is not None:
            text = ast.unparse(target)
            if "WWT_" in text:
                found.append(f"{path.name}:{node.lineno}: {text}")
    return found


def test_only_the_registry_reads_wwt_variables_from_the_environment():
    files = [ROOT / "app.py", *(p for folder in ("app", "workers", "model") for p in (ROOT / folder).rglob("*.py"))]
    reads = [f"{p.relative_to(ROOT)}: {hit}" for p in files if p != ROOT / "model" / "settings.py"
             for hit in _environment_reads(p)]
    assert reads == [], "read these through model.settings instead"
    # ...and the registry itself does read them, so the check above has something to find.
    assert _environment_reads(ROOT / "model" / "settings.py") == []  # it reads by a variable name
    assert "os.environ.get(name" in (ROOT / "model" / "settings.py").read_text()


def test_the_check_above_would_see_a_direct_read(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('import os\nA = os.environ.get("WWT_X", "1")\nB = os.getenv("WWT_Y")\n'
                     'C = os.environ["WWT_Z"]\nD = "WWT_W" in os.environ\nE = os.environ.get("HOME")\n')
    hits = sorted(_environment_reads(probe), key=lambda h: int(h.split(":")[1]))
    assert [h.split(": ", 1)[1] for h in hits] == ["'WWT_X'", "'WWT_Y'", "'WWT_Z'", "'WWT_W'"]


def test_the_registry_imports_only_the_standard_library():
    tree = ast.parse((ROOT / "model" / "settings.py").read_text(encoding="utf-8"))
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules
    out = subprocess.run([sys.executable, "-c", "import sys, model.settings; "
                          "print(sorted(m for m in ('torch', 'celery', 'gradio', 'redis') if m in sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_getters(monkeypatch):
    with pytest.raises(KeyError):
        settings.get("WWT_NO_SUCH_SETTING")
    with pytest.raises(KeyError):
        settings.get_float("WWT_NO_SUCH_SETTING")
    monkeypatch.delenv("WWT_REDIS_URL", raising=False)
    assert settings.get("WWT_REDIS_URL") == "redis://localhost:6379/0"
    monkeypatch.setenv("WWT_REDIS_URL", "redis://:pw@elsewhere:6380/1")
    assert settings.get("WWT_REDIS_URL") == "redis://:pw@elsewhere:6380/1"

    monkeypatch.setenv("WWT_REQUEST_TIMEOUT", " 12.5 ")
    assert settings.get_float("WWT_REQUEST_TIMEOUT") == 12.5
    monkeypatch.setenv("WWT_REQUEST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="WWT_REQUEST_TIMEOUT must be a number, not 'soon'"):
        settings.get_float("WWT_REQUEST_TIMEOUT")
    monkeypatch.delenv("WWT_VISIBILITY_TIMEOUT", raising=False)
    assert settings.get_float("WWT_VISIBILITY_TIMEOUT", default=7.0) == 7.0  # empty: the caller's default
    with pytest.raises(settings.SettingError, match="WWT_VISIBILITY_TIMEOUT must be a number"):
        settings.get_float("WWT_VISIBILITY_TIMEOUT")  # empty and no default

    monkeypatch.delenv("WWT_SLOTS", raising=False)
    assert settings.get_int("WWT_SLOTS", default=None) is None
    monkeypatch.setenv("WWT_SLOTS", "24")
    assert settings.get_int("WWT_SLOTS", default=None) == 24
    monkeypatch.setenv("WWT_SLOTS", "2.5")
    with pytest.raises(settings.SettingError, match="WWT_SLOTS must be a whole number, not '2.5'"):
        settings.get_int("WWT_SLOTS")

    monkeypatch.delenv("WWT_CUDA_GRAPH", raising=False)
    assert settings.get_bool("WWT_CUDA_GRAPH") is True
    for value, expected in (("0", False), ("off", False), ("1", True), ("TRUE", True), ("", True)):
        monkeypatch.setenv("WWT_CUDA_GRAPH", value)
        assert settings.get_bool("WWT_CUDA_GRAPH") is expected, value
    monkeypatch.setenv("WWT_CUDA_GRAPH", "maybe")
    with pytest.raises(settings.SettingError, match="WWT_CUDA_GRAPH"):
        settings.get_bool("WWT_CUDA_GRAPH")


def test_a_setting_that_is_not_a_number_is_one_line_from_the_cli(monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("WWT_CONCURRENCY", "many")
    assert main(["worker", "--model", "tiny=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: WWT_CONCURRENCY must be a whole number, not 'many'"


def test_wire_types_errors_and_contract_import_without_torch():
    """The app and the workers import these before any engine; they must not pull in torch."""
    import subprocess
    import sys

    code = ("import sys, model, model.types, model.errors, model.contract, model.settings; "
            "print(sorted(m for m in ('torch', 'model.serving.engine', 'model.network.gpt') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_api_page_lists_the_request_contract():
    """docs/api.md's table of completion settings shows the contract's own limits and defaults."""
    from model.contract import LIMITS

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    rows = {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^\| `(\w+)` \| (\S+) to \S+ \| (\S+) \|", page, flags=re.M) if m.group(1) in LIMITS}
    assert set(rows) == set(LIMITS)
    for name, limit in LIMITS.items():
        low, default = rows[name]
        assert float(low) == limit.low
        assert default == ("none" if limit.default is None else f"{limit.default:g}")


def test_a_request_is_checked_against_the_contract_once(monkeypatch):
    """The page checks a request; the engine in the same process only narrows it to the model."""
    from model import contract
    from model.errors import BadRequest
    from model.types import CompletionRequest

    calls = []
    real = contract.check_completion
    monkeypatch.setattr(contract, "check_completion", lambda *a, **k: calls.append(1) or real(*a, **k))
    checked = contract.check_completion(CompletionRequest(text="Hi", n=4, temperature=0))
    assert checked.greedy and calls == [1]
    assert isinstance(checked, contract.CheckedCompletion)
    assert contract.narrowed(checked, max_n=8, max_new_tokens=64) is checked and calls == [1]
    with pytest.raises(BadRequest):
        contract.narrowed(checked, max_n=3, max_new_tokens=64)  # the model has fewer slots
    raw = CompletionRequest.from_dict(checked.to_dict())  # across the queue it is a plain request: checked anew
    assert not isinstance(raw, contract.CheckedCompletion)
    assert isinstance(contract.narrowed(raw, max_n=8, max_new_tokens=64), contract.CheckedCompletion)
    assert calls == [1, 1]
