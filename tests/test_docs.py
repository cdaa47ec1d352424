"""The README and the docs as a user reads them: every Python block runs (or says why not), the command-line
page lists every flag of ``--help``, the API reference every public name, the README stays short."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys

import pytest

from tests import forkserver
from tests.conftest import ROOT
from tests.docs_blocks import all_blocks, block, markdown_files

SNIPPETS = [b for b in all_blocks() if b.kind == "snippet"]


def test_every_python_block_is_run_by_a_test_or_says_why_not():
    tests_source = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    blocks = all_blocks()
    assert len(blocks) >= 8  # the parser finds the blocks at all
    for b in blocks:
        if b.kind == "not-run":
            assert len(b.label.split()) >= 3, f"{b.where}: say why the block is not run"
        elif b.kind == "block":
            assert f'block("{b.label}")' in tests_source, f"{b.where}: no test runs the block {b.label!r}"
            assert b.code == block(b.label), f"{b.where}: a second copy of {b.label!r} differs from the first"


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local and [t for t in local if not (ROOT / t).exists()] == []


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in markdown_files()[1:]]
    assert pages and [p for p in pages if p not in nav] == []


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_line_page_lists_every_flag_of_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # --help's lines unwrapped: no flag cut at a hyphen
    hooks = _hooks()
    assert "<!-- flags: examples/train_mnist.py -->" in (ROOT / "docs" / "cli.md").read_text()
    table = hooks.flag_table("examples/train_mnist.py")
    help_text = hooks.load_script("examples/train_mnist.py").build_parser().format_help()
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text)) - {"--help"}
    assert len(flags) > 50
    assert sorted(f for f in flags if f"`{f}`" not in table) == []
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    assert "| `--epochs` `EPOCHS` | `1` |" in table and "| `--lr` `LR` | `0.01` |" in table  # the defaults a run gets
    assert len(rows) == len({line.split("|")[1] for line in rows})  # each flag once


def test_the_api_reference_documents_every_public_name():
    import engine
    import handlers

    entries = {}
    for page in (ROOT / "docs" / "api").glob("*.md"):
        for path in re.findall(r"^::: ([\w.]+)$", page.read_text(), flags=re.M):
            module, _, name = path.rpartition(".")
            try:
                entries[path] = (name, getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):  # a module documented whole
                entries[path] = (name, importlib.import_module(path))
    for package in (engine, handlers):
        missing = [n for n in package.__all__
                   if not any(name == n and obj is getattr(package, n) for name, obj in entries.values())]  # fmt: skip
        assert missing == [], f"{package.__name__}: not in docs/api/"


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[b.where for b in SNIPPETS])
def test_each_snippet_runs_as_written(snippet, tmp_path):
    (tmp_path / "snippet.py").write_text(snippet.code)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = forkserver.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, f"{snippet.where}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr


@pytest.mark.slow
def test_the_readme_handler_program_stops_at_its_target(tmp_path):
    (tmp_path / "stop_at_accuracy.py").write_text(block("stop_at_accuracy.py"))
    proc = forkserver.run([sys.executable, "stop_at_accuracy.py", "--epochs", "30", "--output-dir", "r",
                           "--no-progress", "--patience", "0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "r" / "history.json").read_text())
    assert len(rows) < 30 and rows[-1]["val_accuracy"] >= 0.9 > max(r["val_accuracy"] for r in rows[:-1])
    assert list((tmp_path / "r" / "checkpoints").glob(f"last_iter={rows[-1]['iteration']}.pt"))
