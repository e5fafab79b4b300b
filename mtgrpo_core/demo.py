"""The main job (``make demo`` / ``mtgrpo demo``): ``mtgrpo train`` with no arguments.

It builds the embedded 537k-parameter policy and character tokenizer in-process, warm-starts
it with 1,600 supervised steps on the cpu-3task suite's reference answers, prints per-task
test accuracy (300 items per task), runs 140 MT-GRPO steps with an evaluation every 20 steps,
prints the accuracy again and writes the report (``runs/default/report/report.md`` and PNG
plots). The budgets are steps, so the result does not depend on the machine's speed or load.
``mtgrpo demo`` calls :func:`mtgrpo_core.cli.main` with ``["train"]``; this module imports
the CLI (not the other way round).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["train", *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
