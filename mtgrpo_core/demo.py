"""The main job (``make demo`` / ``mtgrpo demo``): ``mtgrpo train`` with no arguments.

It builds the embedded 537k-parameter policy and character tokenizer in-process, warm-starts
it with ~150 s of supervised training on the cpu-3task suite's reference answers, prints
per-task test accuracy (300 items per task), runs MT-GRPO for ~300 s, prints the accuracy
again and writes the report (``runs/default/report/report.md`` and PNG plots). About 8-9
minutes on 2 CPU cores.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["train", *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
