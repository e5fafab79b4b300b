"""Every code block of README.md and docs/**/*.md, and every figure they quote.

Fenced blocks by info string:

* ``python``: run in a fresh interpreter in a temporary folder, within the block's time budget
  (60 s unless the line before the fence says ``<!-- docs-test: timeout=N -->``). A block that
  needs a GPU or a peer library says ``<!-- docs-test: requires=cuda,vllm -->`` and is skipped,
  with the reason, where that is missing.
* ``bash``: every command is checked without running the long jobs it starts: ``make T`` names a
  Makefile target, ``mtgrpo ...`` parses with the real CLI parser (and ``key=value`` overrides
  and ``--algo`` load through the real config loader), ``pip install ".[x]"`` names declared
  extras, ``python -m M`` / ``python FILE`` / ``bash FILE`` name a module or file that exists.
  Any other command fails the test, so a new kind of command needs a rule here.
* ``toml``: loaded as a run config by ``mtgrpo_core.train.config.load_config``.
* ``text`` and MyST directives (``{toctree}``, ``{automodule}``, ...) are not code.

Budget: the python blocks took 70 s together on the shared 2 cores at load 7 (the TRL quick start 19 s,
the transformers examples 8-15 s each); each block has its own timeout.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT_S = 60
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!-- docs-test: ([^>]*) -->\s*$")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if "_build" not in f.parts]


def blocks():
    """(id, info, code, options) for every fenced block of the docs."""
    out = []
    for path in doc_files():
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            opts = {}
            mk = MARKER.search(before)
            if mk:
                for item in mk.group(1).split():
                    key, _, value = item.partition("=")
                    opts[key] = value
            out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1).strip(), m.group(2), opts))
    return out


ALL = blocks()


def _by(kind):
    return [pytest.param(code, opts, id=bid) for bid, info, code, opts in ALL if info == kind]


def test_every_block_has_a_known_kind():
    known = {"python", "bash", "toml", "text", ""}
    bad = [(bid, info) for bid, info, _, _ in ALL if info not in known and not info.startswith("{")]
    assert not bad, f"fenced blocks of an unknown kind (add a rule to tests/test_docs.py): {bad}"
    assert any(bid.startswith("README.md") for bid, *_ in ALL), "no block found in README.md"


def _missing(requires: str) -> list[str]:
    missing = []
    for req in filter(None, requires.split(",")):
        if req == "cuda":
            import torch

            if not torch.cuda.is_available():
                missing.append("an NVIDIA GPU")
        elif importlib.util.find_spec(req) is None:
            missing.append(f"the peer library {req!r}")
    return missing


@pytest.mark.parametrize("code,opts", _by("python"))
def test_python_block_runs(code, opts, tmp_path):
    missing = _missing(opts.get("requires", ""))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not present here")
    timeout = float(opts.get("timeout", DEFAULT_TIMEOUT_S))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


# ---- bash blocks: each command checked by the real parser / Makefile / pyproject ----------------
def _commands(code: str) -> list[list[str]]:
    cmds = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):   # VAR=value prefixes
            words.pop(0)
        if words and words[0] == "env":
            words.pop(0)
            while words and words[0] == "-u":
                words[:2] = []
        if words:
            cmds.append(words)
    return cmds


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][A-Za-z0-9_-]*):", (ROOT / "Makefile").read_text(), re.M))


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_mtgrpo(args: list[str]) -> None:
    from mtgrpo_core.cli import build_parser
    from mtgrpo_core.train.config import load_config

    try:
        ns = build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"mtgrpo {' '.join(args)}: the CLI parser rejects it (exit {e.code})") from None
    if ns.cmd in ("train", "compare") and not getattr(ns, "resume", False):
        if ns.config is not None:
            assert (ROOT / ns.config).exists(), f"--config {ns.config}: no such file"
        load_config(ns.config, ns.overrides, algo=getattr(ns, "algo", None), out=None)


def _check_command(words: list[str]) -> None:
    cmd, args = words[0], words[1:]
    if cmd == "make":
        missing = [t for t in args if not t.startswith("-") and t not in _make_targets()]
        assert not missing, f"make {args}: no such Makefile target {missing}"
    elif cmd == "mtgrpo":
        _check_mtgrpo(args)
    elif cmd in ("pip", "pip3") and args[:1] == ["install"]:
        for spec in args[1:]:
            m = re.fullmatch(r"(?:\.|mtgrpo_core)(?:\[([a-z,-]+)\])?", spec)
            assert m, f"pip install {spec}: only this package (. or mtgrpo_core[...]) is expected in a block"
            unknown = set(filter(None, (m.group(1) or "").split(","))) - _extras()
            assert not unknown, f"pip install {spec}: extras {unknown} are not declared in pyproject.toml"
    elif cmd == "python" or cmd.endswith("/python"):
        if args[:1] == ["-m"]:
            assert importlib.util.find_spec(args[1]) is not None, f"python -m {args[1]}: no such module"
        else:
            assert (ROOT / args[0]).is_file(), f"python {args[0]}: no such file"
    elif cmd == "bash":
        assert (ROOT / args[0]).is_file(), f"bash {args[0]}: no such file"
    else:
        raise AssertionError(f"{' '.join(words)}: no rule checks {cmd!r} commands (tests/test_docs.py)")


@pytest.mark.parametrize("code,opts", _by("bash"))
def test_bash_block_commands_are_valid(code, opts):
    cmds = _commands(code)
    assert cmds, "an empty bash block"
    for words in cmds:
        _check_command(words)


@pytest.mark.parametrize("code,opts", _by("toml"))
def test_toml_block_is_a_valid_config(code, opts, tmp_path):
    from mtgrpo_core.train.config import load_config

    p = tmp_path / "config.toml"
    p.write_text(code)
    load_config(p)


def test_bash_checker_rejects_bad_commands():
    for bad in (["make", "no-such-target"], ["mtgrpo", "train", "--algo", "nope"], ["mtgrpo", "train", "rl.stepz=3"],
                ["pip", "install", ".[nope]"], ["python", "-m", "no_such_module_xyz"], ["curl", "x"]):
        with pytest.raises((AssertionError, ValueError)):
            _check_command(bad)


# ---- figures: README and docs quote what the committed data says ---------------------------------
def _render_module():
    spec = importlib.util.spec_from_file_location("render_figures", ROOT / "docs" / "render_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_figure_blocks_match_the_data():
    rf = _render_module()
    stale = [f"{p.relative_to(ROOT)}: {names}" for p in rf.doc_files() for names in [rf.render_file(p)[1]] if names]
    assert not stale, f"figure blocks differ from docs/data/results.json (run python docs/render_figures.py): {stale}"
    readme = (ROOT / "README.md").read_text()
    assert "<!-- figures: results-short -->" in readme, "README.md lost its results table"


def test_every_results_row_names_date_commit_machine_command():
    data = _render_module().load_data()
    for row in data["rows"]:
        for key in ("date", "commit", "machine", "command", "link"):
            assert row.get(key), f"{row['id']}: no {key}"
        machine = data["machines"].get(row["machine"], {})
        assert machine.get("short") and machine.get("long"), f"{row['id']}: machine {row['machine']!r} not described"
        assert (ROOT / row["link"]).exists(), f"{row['id']}: link {row['link']} does not exist"
    for e in data["experiments"]:
        assert (ROOT / e["file"]).exists() and e["status"] in ("current", "superseded"), e
    listed = {e["file"] for e in data["experiments"]}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "experiments").glob("*.md")}
    assert on_disk <= listed, f"results files without an experiments page: {sorted(on_disk - listed)}"


def test_readme_size_and_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 11_000, f"README.md has {len(text)} characters  (about 10k at most)"
    assert "make demo" in text and "make test" in text


def test_readme_links_resolve():
    """README.md is read on the repository's web page, not built by Sphinx: its relative links are
    checked here (the docs' links are checked by the -W build)."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "README.md has no relative links"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_quoted_mean_std_figures_are_in_the_records():
    """Every "mean ± std" that README.md or docs/ quote outside the rendered blocks is a figure of a
    committed results file under bench/experiments/ (equal at the quoted precision), so prose cannot
    carry a number that no run produced."""
    quoted_re = re.compile(r"([+-]?\d+\.(\d+)) ± (\d+\.\d+)")
    source_re = re.compile(r"([+-]?\d+\.\d+) ± \+?(\d+\.\d+)")
    records = set()
    for f in (ROOT / "bench" / "experiments").rglob("*.md"):
        records |= {(float(m), float(s)) for m, s in source_re.findall(f.read_text())}
    rendered = re.compile(r"<!-- figures: [a-z0-9-]+ -->.*?<!-- /figures -->", re.S)
    unknown = []
    for path in doc_files():
        for m, dec, s in quoted_re.findall(rendered.sub("", path.read_text())):
            d = len(dec)
            if not any(round(rm, d) == float(m) and round(rs, d) == float(s) for rm, rs in records):
                unknown.append(f"{path.relative_to(ROOT)}: {m} ± {s}")
    assert not unknown, f"figures quoted in the docs but found in no results file: {unknown}"


def test_every_cli_command_says_what_it_does():
    """`mtgrpo COMMAND --help` has a description (what the command does and prints), not only a
    one-line help, for every command; the docs' CLI page is generated from the same parser."""
    import argparse

    from mtgrpo_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    short = [name for name, p in sub.choices.items() if len(p.description or "") < 80]
    assert not short, f"commands without a description of what they do and print: {short}"
