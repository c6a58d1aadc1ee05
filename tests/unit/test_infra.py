"""The cluster and deployment files parse, pass Ray's own validation, and say what copyscan needs."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# What a credential would look like if someone pasted one in.
SECRET = re.compile(r"(aws_access_key_id|aws_secret_access_key|AKIA[0-9A-Z]{16}|password|token:)", re.I)


def test_ray_cluster_yaml_is_a_valid_autoscaling_cluster_without_credentials():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "ray_cluster.yaml").read_text()
    assert not SECRET.search(text)
    config = yaml.safe_load(text)
    validate_config(prepare_config(yaml.safe_load(text)))  # Ray's own schema and defaults
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head schedules no work
    gpu, cpu = nodes["gpu_worker"], nodes["cpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
    for worker in (gpu, cpu):  # autoscaling from zero
        assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
    for node in nodes.values():  # credentials come from the instance profile only
        assert "IamInstanceProfile" in node["node_config"]
    setup = "\n".join(config["setup_commands"])
    makefile = (REPO / "Makefile").read_text()
    torch_spec = re.search(r"TORCH_SPEC \?= (\S+)", makefile).group(1)
    assert (
        torch_spec in setup and "pip install -e ." in setup
    )  # the same torch as everywhere, then the project
    head_start = "\n".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # no unauthenticated dashboard on the network


def test_runtime_env_is_valid_for_ray_and_ships_no_build_outputs():
    from ray.runtime_env import RuntimeEnv

    from jobs._runtime import WORKER_ENV

    text = (REPO / "infra" / "runtime_env.yaml").read_text()
    assert not SECRET.search(text)
    env = yaml.safe_load(text)
    RuntimeEnv(**env, working_dir=str(REPO))  # Ray validates the fields
    assert {".venv", ".git", "demo-output"} <= set(env["excludes"])
    assert WORKER_ENV.items() <= env["env_vars"].items()  # what the entrypoints would otherwise add
