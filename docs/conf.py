"""Sphinx configuration of the mtgrpo_core docs (``make docs``: built with -W, warnings are errors)."""
from __future__ import annotations

import os
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
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autosummary_generate = False
html_theme = "alabaster"
html_title = "mtgrpo_core"
html_static_path: list[str] = []
