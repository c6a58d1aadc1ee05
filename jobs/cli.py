"""The ``copyscan`` command: ``index``, ``merge``, ``scan``, ``calibrate``, ``nightly``, ``report``,
``memorized``, ``generate``, ``query``, ``submit`` and ``demo``, built from each job module's ``JOB`` declaration.

Job modules import their libraries (torch, Ray, faiss) inside their bodies, so declaring every command
here costs no heavy import: only the command run loads what it needs.
"""

from __future__ import annotations

import argparse
import sys

from copyscan.indexing.errors import CopyscanError
from copyscan.jobs import (
    calibrate,
    demo,
    generate,
    index,
    memorized,
    merge,
    nightly,
    query,
    report,
    scan,
    submit,
)
from copyscan.jobs._runtime import Job, JobParser, load_config_class

JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        index.JOB,
        merge.JOB,
        scan.JOB,
        calibrate.JOB,
        nightly.JOB,
        report.JOB,
        memorized.JOB,
        generate.JOB,
        query.JOB,
        submit.JOB,
        demo.JOB,
    )
}


def main(argv: list[str] | None = None) -> int:
    """``copyscan CMD [ARGS]``: parse ``argv`` (default: the command line) and run CMD's job."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return JOBS[args.command].run(args)


def parser() -> argparse.ArgumentParser:
    """The ``copyscan`` parser: one sub-parser per job, whose ``--help`` lists the job's config keys."""
    top = JobParser(
        prog="copyscan",
        description="Find training-data copies in generated images.",
        epilog="copyscan COMMAND --help lists a command's flags and its configuration keys (key=value).",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, job in JOBS.items():
        # argparse %-formats help strings: a summary's "90%" would otherwise break `copyscan --help`
        sub_parser = sub.add_parser(
            name, help=job.summary.replace("%", "%%"), description=job.description, config=job.config
        )
        job.add_arguments(sub_parser)
    return top


# ---------------------------------------------------------------------------------------------------------
# The README's key reference: generated from the same declarations as --help (`make keys`)


def key_sections() -> dict[str, tuple[str, list[str]]]:
    """``{section: (config "module:Class", its commands)}``: one section per config class, named after the
    first command that takes it (``scan`` for ``scan`` and ``nightly``)."""
    commands: dict[str, list[str]] = {}
    for name, job in JOBS.items():
        if job.config:
            commands.setdefault(job.config, []).append(name)
    return {names[0]: (config, names) for config, names in commands.items()}


def readme_keys(text: str) -> str:
    """README ``text`` with the table between each ``<!-- keys:SECTION -->`` and ``<!-- /keys:SECTION -->``
    regenerated from the config class of ``SECTION`` (``key_sections``)."""
    from copyscan.indexing.runtime.config import keys_markdown

    for section, (config, commands) in key_sections().items():
        start, end = f"<!-- keys:{section} -->", f"<!-- /keys:{section} -->"
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise CopyscanError(
                f"the README needs one {start} ... {end} section, for the keys of copyscan "
                f"{' and '.join(commands)}"
            )
        before, rest = text.split(start)
        after = rest.split(end)[1]
        text = f"{before}{start}\n{keys_markdown(load_config_class(config))}\n{end}{after}"
    return text


def write_readme_keys(path: str = "README.md") -> bool:
    """Rewrite the key reference of the README at ``path``; True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = readme_keys(text)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    sys.exit(main())
