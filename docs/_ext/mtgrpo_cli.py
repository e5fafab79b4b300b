"""A Sphinx directive that renders the ``mtgrpo`` command line from its argparse parser.

``{mtgrpo-cli}`` writes, for ``mtgrpo`` and every sub-command, a section holding the command's
description and its ``--help`` text, both taken from :func:`mtgrpo_core.cli.build_parser`, so
the reference cannot drift from the code.
"""
from __future__ import annotations

import argparse
import os

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def cli_help_texts() -> list[tuple[str, str]]:
    """``[(command, help text)]`` for ``mtgrpo`` and each sub-command, at 100 columns."""
    from mtgrpo_core.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"   # argparse wraps to the terminal width: make it fixed
    try:
        root = build_parser()
        out = [("mtgrpo", root.format_help())]
        out += [(f"mtgrpo {name}", sub.format_help()) for name, sub in _subcommands(root)]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out


class MtgrpoCliDirective(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        result: list[nodes.Node] = []
        for name, text in cli_help_texts():
            sec_id = nodes.make_id(name)
            sec = nodes.section(ids=[sec_id], names=[nodes.fully_normalize_name(name)])
            sec += nodes.title(text=name)
            sec += nodes.literal_block(text, text, language="text")
            self.state.document.note_implicit_target(sec, sec)
            result.append(sec)
        return result


def setup(app):
    app.add_directive("mtgrpo-cli", MtgrpoCliDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
