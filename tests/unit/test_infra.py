"""The cluster and deployment files parse, pass Ray's own validation, and say what copyscan needs."""

import argparse
import re
import shutil
import subprocess
import sys
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
    # every node runs the project's image: nothing pip-installed at boot
    assert config["docker"]["image"].endswith("/copyscan:TAG") and config["docker"]["container_name"]
    assert "pip" not in "\n".join(config["setup_commands"] + config.get("worker_setup_commands", []))
    head_start = "\n".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # no unauthenticated dashboard on the network


def test_runtime_env_is_valid_for_ray_and_ships_no_build_outputs():
    from ray.runtime_env import RuntimeEnv

    from copyscan.jobs._runtime import WORKER_ENV

    text = (REPO / "infra" / "runtime_env.yaml").read_text()
    assert not SECRET.search(text)
    env = yaml.safe_load(text)
    RuntimeEnv(**env, working_dir=str(REPO))  # Ray validates the fields
    assert {".venv", ".git", "demo-output"} <= set(env["excludes"])
    assert WORKER_ENV.items() <= env["env_vars"].items()  # what the entrypoints would otherwise add


def test_a_working_dir_runs_the_source_it_ships(tmp_path):
    """Ray starts a job's driver and workers in its working dir (the repository, as shipped), first on
    sys.path: its ``copyscan/`` shadows the image's installed package and must find the sub-packages in the
    shipped folders jobs/, indexing/ and search/, so that the shipped source runs (not the image's, nor a
    mix)."""
    for folder in ("copyscan", "jobs", "indexing", "search"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    code = (
        "import copyscan.jobs.cli as c, copyscan.indexing.errors as e; print(c.__file__); print(e.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert [Path(f).parent.parent for f in done.stdout.split()] == [tmp_path.resolve()] * 2


def _dockerfile_args() -> dict[str, str]:
    text = (REPO / "infra" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def test_dockerfile_pins_what_the_project_pins_and_copies_what_exists():
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert not SECRET.search(text)
    args = _dockerfile_args()
    makefile = (REPO / "Makefile").read_text()
    assert args["TORCH_SPEC"] == re.search(r"TORCH_SPEC \?= (\S+)", makefile).group(1)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu$", text, re.M)
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    assert 'pip install --no-cache-dir ".[gpu,generate]"' in text and "uninstall" not in text


def test_faiss_comes_from_an_extra_cpu_or_gpu():
    """faiss-cpu and faiss-gpu give the same module: each is an extra, so a GPU image installs .[gpu] instead of
    uninstalling one; the Makefile installs .[cpu]."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("faiss") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["cpu"][0].startswith("faiss-cpu") and extras["gpu"][0].startswith("faiss-gpu")
    assert "-e '.[cpu,dev]'" in (REPO / "Makefile").read_text()


def _entrypoint_args(command: str, module: str) -> list[str]:
    """The arguments after `python -m MODULE` in a shell command line, with $VARS given values."""
    import shlex

    words = shlex.split(command.replace("$", "VALUE_"))
    return words[words.index(module) + 1 :]


def test_kuberay_rayjob_runs_the_index_entrypoint_on_gpu_and_cpu_workers():
    from copyscan.jobs import index

    text = (REPO / "infra" / "k8s" / "rayjob-index.yaml").read_text()
    assert not SECRET.search(text)
    job = yaml.safe_load(text)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == _dockerfile_args()["RAY_VERSION"]
    parser = argparse.ArgumentParser()
    index.JOB.add_arguments(parser)
    parsed = parser.parse_args(_entrypoint_args(spec["entrypoint"], "copyscan.jobs.index"))
    assert parsed.shards.startswith("s3://") and parsed.out.startswith("s3://")
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in str(groups["cpu"])
    templates = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in groups.values()
    ]
    assert all(t["spec"]["serviceAccountName"] == "copyscan" for t in templates)  # IRSA, no keys
    assert len({t["spec"]["containers"][0]["image"] for t in templates}) == 1
    # autoscaling from zero worker pods: the pools' demand starts them
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert all(g["replicas"] == 0 == g["minReplicas"] < g["maxReplicas"] for g in groups.values())
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_nightly_raycluster_is_the_index_jobs_cluster():
    cluster = yaml.safe_load((REPO / "infra" / "k8s" / "raycluster.yaml").read_text())
    job = yaml.safe_load((REPO / "infra" / "k8s" / "rayjob-index.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["metadata"]["name"] == "copyscan"
    assert cluster["spec"] == job["spec"]["rayClusterSpec"]  # one cluster spec, written twice, kept equal


def test_nightly_cronjob_submits_a_valid_nightly_command():
    from copyscan.jobs import nightly, submit

    text = (REPO / "infra" / "k8s" / "nightly-cronjob.yaml").read_text()
    assert not SECRET.search(text)
    cron = yaml.safe_load(text)
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "copyscan"
    command = pod["containers"][0]["args"][0]
    # copyscan submit, not ray job submit: the pod exits 3 on a regression and not on an error
    submit_args = _entrypoint_args(command.split(" -- ")[0], "copyscan.jobs.submit")
    parser = argparse.ArgumentParser()
    submit.JOB.add_arguments(parser)
    parsed = parser.parse_args(submit_args)
    cluster = yaml.safe_load((REPO / "infra" / "k8s" / "raycluster.yaml").read_text())
    assert parsed.address == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert parsed.runtime_env == "infra/runtime_env.yaml"
    parser = argparse.ArgumentParser()
    nightly.JOB.add_arguments(parser)
    parsed = parser.parse_args(_entrypoint_args(command, "copyscan.jobs.nightly"))
    assert parsed.index.startswith("s3://") and parsed.history.startswith("s3://") and parsed.baseline
    rules = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "submit", "operator": "In", "values": [3]},
    } in rules
