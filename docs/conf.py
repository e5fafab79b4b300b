"""Sphinx configuration of the mtgrpo_core docs (``make docs``: built with -W, warnings are errors)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
# the API pages import the package; Triton kernels run in the interpreter on a CPU-only machine
os.environ.setdefault("TRITON_INTERPRET", "1")

project = "mtgrpo_core"
author = "mtgrpo_core contributors"
copyright = "2026, mtgrpo_core contributors (Apache-2.0)"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "mtgrpo_cli",   # _ext/mtgrpo_cli.py: the CLI reference from mtgrpo_core.cli.build_parser()
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "data", "_ext", "README.md"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
# the project's own pages use NumPy-style docstrings
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True   # "Attributes" sections as fields: no second description of dataclass fields
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autosummary_generate = False
html_theme = "alabaster"
# the hidden glob toctree of index.md only keeps pages that others add from failing the -W build;
# the sidebar shows the explicit toctrees
html_theme_options = {"sidebar_includehidden": False}
html_title = "mtgrpo_core"
html_static_path: list[str] = []

# The docstrings are NumPy style written as plain text: "|x|" is an absolute value, not an rST
# substitution, a "*" inside a name pattern ("token_*") is not emphasis, and a heading that is
# not a NumPy section ("What", "Parameters (besides GRPOTrainer's)") is a paragraph title, not a
# document section. This hook says so before napoleon reads them.
_NUMPY_SECTIONS = {
    "args", "arguments", "attention", "attributes", "caution", "danger", "error", "example", "examples",
    "hint", "important", "keyword args", "keyword arguments", "methods", "note", "notes", "other parameters",
    "parameters", "receive", "receives", "references", "return", "returns", "raise", "raises", "see also",
    "tip", "todo", "warning", "warnings", "warn", "warns", "yield", "yields",
}
_HEADING = re.compile(r"^([ \t]*)(\S[^\n]*)\n\1([-=~^])\3{2,}[ \t]*$", re.M)
_ABS = re.compile(r"(?<![`\\|])\|(?=[^\s|`])([^|\n`]*?[^\s|`\\])\|(?![|`_])")
_LITERAL = re.compile(r"(``.+?``|`[^`\n]+`)", re.S)
_STAR = re.compile(r"(?<=[\w\"'])\*(?=[_\"'\w])|(?<=[_\"'])\*")


def _heading(m: re.Match) -> str:
    indent, title, mark = m.group(1), m.group(2).strip(), m.group(3)
    if title.lower() in _NUMPY_SECTIONS:
        return m.group(0)
    head = title.split(" (")[0].lower()
    if head in _NUMPY_SECTIONS:   # "Parameters (besides GRPOTrainer's)": napoleon's section + the remark
        section = title.split(" (")[0]
        return f"{indent}{title}:\n\n{indent}{section}\n{indent}{mark * len(section)}"
    return f"{indent}**{title}**\n"


def _plain_docstring(app, what, name, obj, options, lines):
    text = "\n".join(lines)
    parts = _LITERAL.split(_HEADING.sub(_heading, text))
    for i in range(0, len(parts), 2):   # the text outside ``literals`` and `roles`
        t = _ABS.sub(r"\\|\1\\|", parts[i])
        t = t.replace("_*", "\\_\\*").replace("*_", "\\*\\_")   # "token_*", "*_mask": names, not markup
        parts[i] = _STAR.sub(r"\\*", t)
    lines[:] = "".join(parts).split("\n")


def setup(app):
    app.connect("autodoc-process-docstring", _plain_docstring, priority=400)   # before napoleon (500)
