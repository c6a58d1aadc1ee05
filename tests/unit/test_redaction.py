"""Credentials in storage options: which option names are secret, and the redacted copies that are written."""

import copy

import yaml

from copyscan.indexing.runtime.config import resolve, to_dict
from copyscan.indexing.store import storage
from copyscan.indexing.store.outputs import claim_output
from copyscan.search.scan_config import ScanConfig

SECRET_NAMES = [
    "key",
    "secret",
    "token",
    "password",
    "KEY",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "account_key",
    "AccountKey",
    "sas_token",
    "client_secret",
    "connection_string",
    "credentials",
    "api-key",
    "apikey",
    "Authorization",
    "x-amz-security-token",
    "SSECustomerKey",
]
HARMLESS_NAMES = [
    "endpoint_url",
    "region_name",
    "anon",
    "use_ssl",
    "profile",
    "client_kwargs",
    "config_kwargs",
    "s3_additional_kwargs",
    "requester_pays",
    "signature_version",
    "headers",
    "account_name",
    "monkey",
    "version_aware",
]


def test_secret_option_names():
    assert [n for n in SECRET_NAMES if not storage.is_secret_option(n)] == []
    assert [n for n in HARMLESS_NAMES if storage.is_secret_option(n)] == []


def test_redact_replaces_secrets_at_any_depth_and_keeps_the_rest():
    options = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIA-real",
        "secret": "s3cr3t",
        "anon": False,
        "use_ssl": True,
        "region_name": "eu-west-1",
        "token": None,  # nothing to hide: kept as it is
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "tok"},
        "config_kwargs": {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 3}},
        "headers": [{"Authorization": "Bearer abc", "Accept": "*/*"}],
        "credentials": {"type": "service_account", "private_key": "-----BEGIN"},
    }
    before = copy.deepcopy(options)
    assert storage.redact(options) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "***",
        "secret": "***",
        "anon": False,
        "use_ssl": True,
        "region_name": "eu-west-1",
        "token": None,
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "***"},
        "config_kwargs": {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 3}},
        "headers": [{"Authorization": "***", "Accept": "*/*"}],
        "credentials": "***",  # a secret's whole value, whatever its shape
    }
    assert options == before  # the options in use are not changed


def test_written_configs_hold_no_secret_and_the_config_keeps_them(tmp_path):
    options = {
        "endpoint_url": "http://h:1",
        "key": "SECRET-ID-7f3a9",
        "secret": "SECRET-PW-9c2e4",
        "client_kwargs": {"token": "SECRET-TOKEN-41b8d"},
    }
    cfg = resolve(
        ScanConfig, {"index": "i", "queries": "q", "out": str(tmp_path / "run")}, {"storage_options": options}
    )
    record = to_dict(cfg)
    assert record["storage_options"] == {
        "endpoint_url": "http://h:1",
        "key": "***",
        "secret": "***",
        "client_kwargs": {"token": "***"},
    }
    assert cfg.storage_options == options  # what the job uses
    assert "SECRET-PW-9c2e4" not in repr(cfg) and "SECRET-ID-7f3a9" not in repr(cfg)
    # whatever dict a caller gives claim_output, the config file holds no secret; resuming compares fine
    out = str(tmp_path / "run")
    raw = {**record, "storage_options": options}
    assert claim_output(out, "run.yaml", raw, "resume", ScanConfig.RESUME_KEYS) is False
    text = (tmp_path / "run" / "run.yaml").read_text()
    assert not any(s in text for s in ("SECRET-ID-7f3a9", "SECRET-PW-9c2e4", "SECRET-TOKEN-41b8d"))
    assert yaml.safe_load(text)["storage_options"]["endpoint_url"] == "http://h:1"
    (tmp_path / "run" / "part").write_text("x")
    assert claim_output(out, "run.yaml", raw, "resume", ScanConfig.RESUME_KEYS) is True


def test_a_local_cluster_gets_no_credential_through_runtime_env(monkeypatch):
    """Ray logs a runtime_env's env_vars; local workers inherit the environment, remote ones need them."""
    from copyscan.jobs._runtime import WORKER_ENV, worker_env

    env = {
        "AWS_ACCESS_KEY_ID": "id-2",
        "AWS_SECRET_ACCESS_KEY": "pw-2",
        "AWS_SESSION_TOKEN": "t-2",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ENDPOINT_URL_S3": "http://h:2",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    public = {"AWS_DEFAULT_REGION": "eu-west-3", "AWS_ENDPOINT_URL_S3": "http://h:2"}
    assert worker_env(local=True) == {**WORKER_ENV, **public}
    assert env.items() <= worker_env(local=False).items()
