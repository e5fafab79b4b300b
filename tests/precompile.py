"""Bytecode of the installed modules the test suite imports, compiled once at setup.

``make test`` installs its dependencies without compiling them (``uv pip install`` without
``--compile-bytecode``: compiling all ~19,000 modules of the environment took 25 s on 2 cores)
and then runs this script, which compiles only the ~5,600 that the suite and its subprocesses
import, listed in ``tests/pyc-manifest.txt`` (paths relative to site-packages), on every core.
Left to the first import instead, both test processes compile the same modules side by side at
collection (the suite took 206 s against 188 s with the bytecode there).

A module missing from the list is compiled where it is first imported, as Python always does;
a listed file that is not installed is skipped. So a stale list costs time, never a failure.

Usage::

    python tests/precompile.py                 # compile the listed modules (make test's setup)
    python tests/precompile.py --record VENV   # rewrite the list from VENV's site-packages

``--record`` reads which ``.pyc`` files exist under VENV: run it on an environment installed
without bytecode after a full ``make test`` there (``make test VENV=/tmp/v PRECOMPILE=0``
installs it that way), so that what exists is what was imported.
"""
from __future__ import annotations

import argparse
import os
import py_compile
import sys
import sysconfig
from concurrent.futures import ProcessPoolExecutor

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyc-manifest.txt")


def _compile_chunk(paths: list[str]) -> int:
    done = 0
    for p in paths:
        try:
            # the invalidation mode Python uses at import (source timestamps), so the file is taken
            py_compile.compile(p, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
            done += 1
        except (py_compile.PyCompileError, OSError):
            pass  # a module that does not compile is not imported either; Python reports it there
    return done


def compile_listed(manifest: str = MANIFEST, jobs: int | None = None) -> tuple[int, int]:
    """Compile the listed files that exist under this interpreter's site-packages.
    Returns (compiled, listed)."""
    purelib = sysconfig.get_paths()["purelib"]
    with open(manifest) as f:
        rel = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    paths = [os.path.join(purelib, r) for r in rel]
    paths = [p for p in paths if os.path.isfile(p)]
    jobs = jobs or os.cpu_count() or 1
    chunks = [paths[i::jobs * 4] for i in range(jobs * 4)]
    if jobs == 1:
        return sum(map(_compile_chunk, chunks)), len(rel)
    with ProcessPoolExecutor(jobs) as ex:
        return sum(ex.map(_compile_chunk, chunks)), len(rel)


def record(venv: str, manifest: str = MANIFEST) -> int:
    """Write the manifest from the ``.pyc`` files present under ``venv``'s site-packages."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        raise SystemExit(f"--record: no interpreter at {py}")
    import subprocess

    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    tag = sys.implementation.cache_tag
    found = set()
    for root, _dirs, files in os.walk(purelib):
        if os.path.basename(root) != "__pycache__":
            continue
        src_dir = os.path.dirname(root)
        for name in files:
            parts = name.split(".")
            if len(parts) == 3 and parts[1] == tag and parts[2] == "pyc":
                src = os.path.join(src_dir, parts[0] + ".py")
                if os.path.isfile(src):
                    found.add(os.path.relpath(src, purelib))
    with open(manifest, "w") as f:
        f.write("# site-packages modules the test suite imports (tests/precompile.py --record)\n")
        f.writelines(p + "\n" for p in sorted(found))
    return len(found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", metavar="VENV", help="rewrite the list from VENV's .pyc files")
    ap.add_argument("--jobs", type=int, default=None, help="processes (default: every core)")
    args = ap.parse_args(argv)
    if args.record:
        print(f"precompile: {record(args.record)} modules listed in {MANIFEST}")
        return 0
    done, listed = compile_listed(jobs=args.jobs)
    print(f"precompile: {done} of {listed} listed modules compiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
