"""Sphinx directives that render the ``mtgrpo`` command line from its argparse parser and the
run config's keys from its dataclasses.

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


def config_rows() -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """``[(section, [(key, type, default, comment)])]`` of :class:`mtgrpo_core.train.config.TrainConfig`,
    the comments read from each field's line in the source."""
    import dataclasses
    import inspect
    import re
    import typing

    from mtgrpo_core.train import config as C

    out = []
    hints = typing.get_type_hints(C.TrainConfig)
    for sec in dataclasses.fields(C.TrainConfig):
        cls = hints[sec.name]
        src = inspect.getsource(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            m = re.search(rf"^\s+{re.escape(f.name)}\s*:[^\n#]*#\s*([^\n]*)$", src, re.M)
            ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((f.name, ftype, default, m.group(1).strip() if m else ""))
        out.append((sec.name, rows))
    return out


def _table(header: list[str], rows: list[list[nodes.Node]], widths: list[int]) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(header))
    table += group
    group += [nodes.colspec(colwidth=w) for w in widths]

    def row(cells: list[nodes.Node]) -> nodes.row:
        r = nodes.row()
        for c in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", c)
            r += entry
        return r

    head = nodes.thead()
    head += row([nodes.Text(h) for h in header])
    body = nodes.tbody()
    body += [row(cells) for cells in rows]
    group += [head, body]
    return table


class MtgrpoConfigDirective(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        result: list[nodes.Node] = []
        for section, rows in config_rows():
            result.append(nodes.rubric(text=f"[{section}]"))
            result.append(_table(["key", "type", "default", "meaning"],
                                 [[nodes.literal(text=f"{section}.{key}"), nodes.Text(ftype),
                                   nodes.literal(text=default), nodes.Text(comment)]
                                  for key, ftype, default, comment in rows], [20, 10, 15, 55]))
        return result


class MtgrpoAutosummaryDirective(SphinxDirective):
    """``.. mtgrpo-autosummary:: MODULE`` (inside an ``eval-rst`` block): an autosummary table of the
    classes and functions in ``MODULE.__all__``, so the table follows the module's exports."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        import importlib
        import inspect

        from docutils.statemachine import StringList

        name = self.arguments[0]
        mod = importlib.import_module(name)
        members = [m for m in getattr(mod, "__all__", [])
                   if inspect.isclass(getattr(mod, m, None)) or inspect.isfunction(getattr(mod, m, None))]
        lines = [".. autosummary::", ""] + [f"   {name}.{m}" for m in members]
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"mtgrpo-autosummary {name}"), self.content_offset, node)
        return node.children


def setup(app):
    app.add_directive("mtgrpo-cli", MtgrpoCliDirective)
    app.add_directive("mtgrpo-config", MtgrpoConfigDirective)
    app.add_directive("mtgrpo-autosummary", MtgrpoAutosummaryDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
