"""Static checks of infra/: manifests parse and say what the cluster needs, scripts are valid bash.

Fast (no cluster, no network). Versions are checked against pyproject.toml so a Ray upgrade that
forgets the images fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
LOCAL = INFRA / "local"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
SCRIPTS = sorted(LOCAL.glob("*.sh"))
STORAGE_PATH = "/mnt/shared"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|_KEY$|DB_URL|CREDENTIAL", re.IGNORECASE)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_docs(kind: str | None = None) -> list[dict]:
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]
    return [doc for doc in docs if kind is None or doc["kind"] == kind]


def ray_requirement() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(dep for dep in deps if re.match(r"ray(\[|\s|>|=|$)", dep))


def ray_pin() -> str:
    """The Ray minor release pyproject pins (`ray[...]==2.60.*` -> "2.60")."""
    match = re.search(r"==\s*([0-9]+\.[0-9]+)\.\*$", ray_requirement())
    assert match, (
        f"ray dependency {ray_requirement()!r} is not pinned to one minor release (==X.Y.*)"
    )
    return match.group(1)


def walk(node):
    """Every dict inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def ray_pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(doc["metadata"]["name"], doc["spec"]) for doc in k8s_docs("RayCluster")]
    specs += [
        (doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]) for doc in k8s_docs("RayJob")
    ]
    return specs


# --- every file ---------------------------------------------------------------------------------


def test_there_is_something_to_check():
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {"k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/mlflow.yaml", "vm/cluster.yaml"} <= names
    assert {"start.sh", "stop.sh", "env.sh"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"
    if path.parent == K8S:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: {doc.get('kind')}"
            assert doc["metadata"].get("name"), f"{path}: {doc['kind']} without a name"


def test_no_kubernetes_secret_objects_are_committed():
    # Secrets are created with `kubectl create secret` (infra/README.md), never applied from git.
    assert not k8s_docs("Secret")


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_secret_env_values_come_from_secrets(path):
    for doc in load_all(path):
        for node in walk(doc):
            if (
                "name" in node
                and ("value" in node or "valueFrom" in node)
                and SECRET_NAME.search(str(node["name"]))
            ):
                assert "value" not in node, f"{path}: literal value for {node['name']}"
                assert "secretKeyRef" in node["valueFrom"], f"{path}: {node['name']}"


# --- Ray on Kubernetes --------------------------------------------------------------------------


def test_ray_images_match_pyproject_ray_version():
    import ray

    version = ray_pin()
    assert ray.__version__.startswith(f"{version}."), (
        ray.__version__,
        version,
    )  # what the suite runs on
    images = [
        c["image"]
        for doc in k8s_docs()
        for node in walk(doc)
        for c in node.get("containers", [])
        if isinstance(c, dict) and c.get("image", "").startswith("rayproject/ray")
    ]
    assert images
    for image in images:
        assert image.split(":")[1].split("-")[0].startswith(f"{version}."), image
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"].startswith(f"{version}."), name


def test_ray_clusters_have_gpu_workers_shared_storage_shm_and_token_auth():
    specs = ray_cluster_specs()
    assert {name for name, _ in specs} == {"mg-ray", "mg-ray-study"}
    for name, spec in specs:
        workers = spec["workerGroupSpecs"]
        assert workers, name
        gpu = [c for w in workers for c in containers(w["template"]["spec"])]
        assert all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in gpu), name
        for pod in ray_pod_specs(spec):
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
                claim = volumes[mounts[STORAGE_PATH]]["persistentVolumeClaim"]["claimName"]
                assert claim == "mg-ray-shared", name
                env = {e["name"]: e for e in c["env"]}
                assert env["RAY_AUTH_MODE"]["value"] == "token", name
                assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], name
                assert env["MG_RAY_HOME"]["value"] == STORAGE_PATH, name
                assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000", name


def test_shared_claim_is_read_write_many():
    (claim,) = k8s_docs("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "mg-ray-shared"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_study_entry_point_with_the_token():
    (job,) = k8s_docs("RayJob")
    assert job["spec"]["entrypoint"].startswith("python jobs/tune.py --space search_spaces/")
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert "working_dir" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])


# --- MLflow on Kubernetes -----------------------------------------------------------------------


def test_mlflow_server_uses_postgres_s3_and_basic_auth():
    (deployment,) = [d for d in k8s_docs("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["command"] + container["args"])
    assert "--app-name basic-auth" in script
    assert '--backend-store-uri "$MLFLOW_DB_URL"' in script
    assert '--artifacts-destination "$ARTIFACTS_DESTINATION"' in script
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_DB_URL"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    for name in (
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    (config,) = k8s_docs("ConfigMap")
    assert config["data"]["ARTIFACTS_DESTINATION"].startswith("s3://")
    services = {s["metadata"]["name"] for s in k8s_docs("Service")}
    assert {"mlflow", "mlflow-postgres"} <= services
    (postgres,) = k8s_docs("StatefulSet")
    assert postgres["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:")


def test_mlflow_image_version_within_pyproject_range():
    dockerfile = (K8S / "mlflow.Dockerfile").read_text()
    versions = set(re.findall(r"mlflow(?::v|\[auth\]==)([0-9.]+)", dockerfile))
    assert len(versions) == 1, versions
    (major,) = {v.split(".")[0] for v in versions}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    mlflow = next(dep for dep in deps if dep.startswith("mlflow"))
    assert f">={major}." in mlflow and f"<{int(major) + 1}" in mlflow, (mlflow, versions)


# --- Ray cluster launcher -----------------------------------------------------------------------


def test_vm_cluster_yaml_is_valid_for_the_launcher():
    config = yaml.safe_load((INFRA / "vm" / "cluster.yaml").read_text())
    schema_path = Path(__import__("ray").__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in start
    assert config["file_mounts"]["~/.ray/auth_token"]
    assert ray_requirement() in " ".join(config["setup_commands"])


# --- local scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", str(path)], check=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["start.sh", "stop.sh"])
def test_scripts_are_strict_and_executable(name):
    path = LOCAL / name
    assert "set -euo pipefail" in path.read_text()
    assert path.stat().st_mode & 0o111


def test_start_binds_loopback_and_enables_token_auth():
    text = (LOCAL / "start.sh").read_text()
    assert "--node-ip-address=127.0.0.1" in text
    assert "--dashboard-host=127.0.0.1" in text
    assert "--host 127.0.0.1" in text  # mlflow server
    assert "0.0.0.0" not in text
    assert "RAY_AUTH_MODE=token" in text
    assert "--app-name basic-auth" in text


def test_env_sh_prints_the_client_environment(tmp_path):
    out = subprocess.run(
        ["bash", str(LOCAL / "env.sh")],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "MG_RAY_HOME": str(tmp_path / "h"),
            "MG_RAY_DASHBOARD_PORT": "18265",
            "MG_RAY_MLFLOW_PORT": "15000",
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "export RAY_ADDRESS=http://127.0.0.1:18265" in out
    assert "export RAY_AUTH_MODE=token" in out
    assert f"export RAY_AUTH_TOKEN_PATH={tmp_path}/h/stack/ray_auth_token" in out
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:15000" in out
