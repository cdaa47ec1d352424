"""MkDocs hooks: the command-line page generated from a script's own parser (never copied), so a flag added,
renamed or removed changes the page with it. ``tests/test_docs.py`` checks the page against ``--help``."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- flags: (\S+) -->")
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):(?=<code>)")  # Sphinx's roles, read by no one here


def load_script(relative: str) -> Any:
    """The script as a module (not run: its ``__main__`` block stays out), imported from the checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"docs_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.choices:
        return f"{names} `{'|'.join(str(c) for c in action.choices)}`"
    if action.nargs == 0:
        return names
    return f"{names} `{action.metavar or action.dest.upper()}`"


def _default(action: argparse.Action, resolved: Any) -> str:
    value = getattr(resolved, action.dest, action.default)
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        value = "on" if value else "off"
    return "" if value is None else f"`{value}`"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def flag_table(relative: str) -> str:
    """Every flag of ``relative``'s ``build_parser()``, one table per argument group, with the default a run
    gets when the flag is not given (the script's settings class and its default preset)."""
    script = load_script(relative)
    parser = script.build_parser()
    from handlers import cli

    settings_cls = next(v for v in vars(script).values() if isinstance(v, type) and v.__module__ == script.__name__
                        and hasattr(v, "__dataclass_fields__"))  # fmt: skip
    resolved = cli.settings_from_args(parser.parse_args([]), settings_cls, getattr(script, "PRESETS", None))
    out = []
    for group in parser._action_groups:  # argparse keeps its groups here, in the order of --help
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        out += [f"### {group.title}", ""]
        if group.description:
            out += [group.description, ""]
        out += ["| flag | default | what |", "| --- | --- | --- |"]
        out += [f"| {_flag(a)} | {_cell(_default(a, resolved))} | {_cell(a.help)} |" for a in actions]
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: flag_table(m.group(1)), markdown)


def on_post_page(output: str, page: Any, config: Any, **kwargs: Any) -> str:
    """The docstrings' Sphinx roles (``:func:`fit```) shown as the plain code they name."""
    return ROLE.sub("", output)
