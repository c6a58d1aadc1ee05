"""``copyscan submit --address URL -- COMMAND`` / ``python -m copyscan.jobs.submit``: run COMMAND as a Ray job
on a cluster, stream its log, and exit with COMMAND's own exit status.

``ray job submit`` exits 1 for every job that fails, so a scheduler cannot tell a nightly scan that found a
significant rise of the replication rate (``copyscan nightly`` exits 3) from one that crashed. This waits for
the job and exits 0 when it succeeded, the entrypoint's exit status when it failed with one (3: regression;
2: a problem copyscan reported), and 1 when the job failed otherwise (stopped, lost, no status).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time

from copyscan.jobs._runtime import Job

POLL_S = 2.0
# How Ray's job manager words an entrypoint's non-zero exit in the job's status message.
EXIT_CODE = re.compile(r"failed with exit code (\d+)")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    parser.add_argument("--working-dir", default=".", help="shipped with the job (default: .)")
    parser.add_argument("--runtime-env", default="infra/runtime_env.yaml", help="YAML runtime environment")
    parser.add_argument("--submission-id", help="the job's id (default: Ray's)")
    parser.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS ...]")


def exit_status(status: str, message: str | None) -> int:
    """The exit status for a finished Ray job: 0 when it SUCCEEDED, the entrypoint's exit code when its
    message gives one, else 1."""
    if status == "SUCCEEDED":
        return 0
    found = EXIT_CODE.search(message or "")
    return int(found.group(1)) if found and int(found.group(1)) != 0 else 1


def _body(args: argparse.Namespace) -> int:
    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    from copyscan.indexing.errors import CopyscanError

    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not command:
        raise CopyscanError("give the command to run after --, e.g. -- python -m copyscan.jobs.nightly ...")
    with open(args.runtime_env) as f:
        runtime_env = {**(yaml.safe_load(f) or {}), "working_dir": args.working_dir}
    client = JobSubmissionClient(args.address)
    job = client.submit_job(
        entrypoint=shlex.join(command), runtime_env=runtime_env, submission_id=args.submission_id
    )
    print(f"copyscan submit: job {job} on {args.address}", file=sys.stderr)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    shown = 0
    while True:
        info = client.get_job_info(job)
        logs = client.get_job_logs(job)
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if info.status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            break
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job)
            raise CopyscanError(f"job {job} still {info.status} after {args.timeout:.0f} s: stopped")
        time.sleep(POLL_S)
    status = exit_status(str(info.status.value), info.message)
    print(f"copyscan submit: job {job} {info.status.value}: exit status {status}", file=sys.stderr)
    return status


JOB = Job(
    name="submit",
    summary="run a command as a Ray job on a cluster and exit with its own exit status (nightly's 3)",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    uses_ray=False,
    config_arguments=False,
)

if __name__ == "__main__":
    sys.exit(JOB.main())
