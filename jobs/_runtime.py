"""What every job entrypoint shares: the ``Job`` runner, logging set-up, Ray start/attach, config layers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.malloc import ONE_ARENA_ENV

logger = logging.getLogger("copyscan")

# Set in the driver too: img2dataset's albumentations import would otherwise try to phone home.
DRIVER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}
# Passed to every Ray worker: DRIVER_ENV, and one malloc arena (an embedding actor's model runs on threads of
# Ray's call pool: ``malloc.ONE_ARENA_ENV``), which the driver and Ray's own processes are started without.
WORKER_ENV = {**DRIVER_ENV, **ONE_ARENA_ENV}
# Forwarded to workers when set on the driver, so object-store credentials/endpoints reach every task.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "COPYSCAN_CACHE",
)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3", "aiobotocore", "filelock", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to the cluster at ``address`` / $RAY_ADDRESS, or start a local one (bound to 127.0.0.1).

    Does nothing if Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = worker_env(local=not address)
    if address:
        # Under `ray job submit` the job's runtime_env already reaches every worker, and Ray refuses to
        # merge an env var given twice: add only what the job does not set.
        for key in job_env_vars():
            env.pop(key, None)
        ray.init(
            address=address, runtime_env={"env_vars": env} if env else None, logging_level=logging.WARNING
        )
        return
    # A private local cluster: keep every service on loopback, no dashboard, no auth token to manage.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    _loopback_only()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def _loopback_only() -> None:
    """Make the local Ray about to start listen on 127.0.0.1 only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported: set later (``ray`` is imported
    by every ``*_ray.py`` module, and by a user's code before ``copyscan.index()``), it changes nothing and
    Ray's GCS, raylet, workers and agents listen on every interface (tests/integration/test_local_bind.py
    saw them on 0.0.0.0, :: and the host's address). So the flag it was read into is set as well.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in (
        "1",
        "true",
    )


def worker_env(local: bool) -> dict[str, str]:
    """The env_vars ``init_ray`` gives every Ray worker: ``WORKER_ENV`` and the ``FORWARDED_ENV`` set here.

    Ray writes a runtime_env's env_vars in plain text into its session logs (``runtime_env_agent.log``)
    and its job table, so a local cluster gets no credential through them (``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_ACCESS_KEY_ID``): its workers inherit this process's environment anyway.
    A remote cluster's workers have no other way to them.
    """
    from copyscan.indexing.store.storage import is_secret_option

    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if local:
        forwarded = {k: v for k, v in forwarded.items() if not is_secret_option(k)}
    return {**WORKER_ENV, **forwarded}


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env this driver was submitted with (``ray job submit``), else {}."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}
    return dict(runtime_env.get("env_vars") or {})


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --ray-address, --num-cpus, -v and the key=value overrides of a configured job (its keys
    are listed after the flags: ``JobParser``)."""
    parser.add_argument("--config", help="YAML file of key: value settings (overridden by key=value)")
    parser.add_argument(
        "--ray-address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when no cluster is given")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings of the job: its keys are listed below"
    )


class JobParser(argparse.ArgumentParser):
    """An argument parser whose ``--help`` ends with the keys of its job's config (``Job.config``).

    The config class is imported only when the help is shown: config modules import the libraries they
    check values against (torch, faiss), which ``copyscan CMD`` without ``--help`` loads only for CMD.
    """

    def __init__(self, *args: Any, config: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.config = config

    def format_help(self) -> str:
        if self.config and self.epilog is None:
            from copyscan.indexing.runtime.config import keys_text

            cls = load_config_class(self.config)
            keys = {f.name for f in dataclasses.fields(cls)}
            # the flags and positionals that set a key too (--index, RUN)
            flags = {
                a.dest: a.option_strings[-1] if a.option_strings else (a.metavar or a.dest)
                for a in self._actions
                if a.dest in keys
            }
            self.epilog = keys_text(cls, flags)
        return super().format_help()


def load_config_class(path: str) -> type:
    """The config dataclass named by ``path``, ``"package.module:ClassName"``."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Job:
    """One job: the ``copyscan NAME`` command and the ``python -m copyscan.jobs.NAME`` entrypoint, declared
    once.

    The runner sets up logging, starts or attaches Ray when ``uses_ray`` (before ``body``), and turns a
    CopyscanError into its message on stderr and exit status 2. ``body(args)`` does the job's own work and
    prints its result; it returns None (exit status 0) or the job's own exit status (nightly's 3).
    """

    name: str  # the copyscan subcommand, and the module copyscan.jobs.NAME
    summary: str  # its line in ``copyscan --help``
    description: str  # ``--help`` text: the job module's docstring
    arguments: Callable[[argparse.ArgumentParser], None]  # the job's own flags and positionals
    body: Callable[[argparse.Namespace], int | None]
    uses_ray: bool = True  # jobs that run in this process (report, merge, ...) start no Ray
    config_arguments: bool = True  # --config, --ray-address, --num-cpus, -v and key=value overrides
    # "module:Class" of the config dataclass that key=value sets, its keys listed by --help and the README;
    # a name, not the class, so that declaring every job imports no config module (they import torch, faiss)
    config: str | None = None

    def config_class(self) -> type | None:
        """The job's config dataclass (imported now), None for a job without one."""
        return load_config_class(self.config) if self.config else None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The job's arguments, then (``config_arguments``) the config, Ray and logging ones."""
        self.arguments(parser)
        if self.config_arguments:
            add_common_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        """Run ``body`` with logging (and Ray) set up; returns the exit status."""
        setup_logging(args.verbose)
        try:
            if self.uses_ray:
                init_ray(args.ray_address, args.num_cpus)
            status = self.body(args)
        except CopyscanError as exc:
            logger.error("%s", exc)
            print(f"copyscan: error: {exc}", file=sys.stderr)
            return 2
        return status or 0

    def main(self, argv: list[str] | None = None) -> int:
        """``python -m copyscan.jobs.NAME [ARGS]``: parse ``argv`` (default: the command line) and run."""
        parser = JobParser(
            prog=f"python -m copyscan.jobs.{self.name}", description=self.description, config=self.config
        )
        self.add_arguments(parser)
        return self.run(parser.parse_args(argv))


def layers(args: argparse.Namespace, explicit: dict[str, Any]) -> Sequence[dict[str, Any]]:
    """Config layers in precedence order: file, then the named flags, then key=value overrides."""
    from copyscan.indexing.runtime.config import load_yaml_file, parse_overrides

    return (
        load_yaml_file(args.config),
        {k: v for k, v in explicit.items() if v is not None},
        parse_overrides(args.overrides),
    )
