"""The ``copyscan`` command: ``index``, ``merge``, ``scan``, ``calibrate``, ``nightly``, ``report``,
``memorized``, ``query`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "index": ("jobs.index", "embed LAION-format webdataset shards and build a sharded FAISS index"),
    "merge": ("jobs.merge", "repack a finished index's small shards into fewer, larger ones"),
    "scan": ("jobs.scan", "search generated images against an index; write matches/ and summary.json"),
    "calibrate": (
        "jobs.calibrate",
        "estimate the score thresholds for 90%/99% precision from the index's images",
    ),
    "nightly": (
        "jobs.nightly",
        "scan a checkpoint's generations, append to the history, exit 3 on a significant rise",
    ),
    "report": (
        "jobs.report",
        "statistics (gen→train vs train→train), duplicates and a self-contained HTML report of a scan",
    ),
    "memorized": (
        "jobs.memorized",
        "flag prompts whose generations form a clique of near-identical images (Carlini et al.)",
    ),
    "query": ("jobs.query", 'SQL over scan results with DuckDB: copyscan query RUN [RUN ...] "SELECT ..."'),
    "demo": ("jobs.demo", "the whole path offline on real images: img2dataset, index, scan, planted copies"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="copyscan", description="Find training-data copies in generated images."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command being run (each pulls in torch/ray/faiss as it needs).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            sub_parser.description = module.__doc__
            module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).run(args)


if __name__ == "__main__":
    sys.exit(main())
