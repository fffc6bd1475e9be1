"""cluster/: launcher configs pass Ray's own validator, KubeRay manifests have what a RayCluster and a
RayJob need, and no config or code default in the repository opens Ray's dashboard, the Jobs API
or MLflow to the internet. Each check is also run on deliberately broken copies, which must fail.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.localray import BIN, MARKER_VAR, free_port, kill_marked, marked_pids
from tests.pgserver import PostgresServer, PostgresUnavailable

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PRESETS = {p.stem for p in (REPO / "tuning" / "presets").glob("*.yaml")}
RAY_PIN = next(
    line.split("==")[1].strip()
    for line in (REPO / "requirements.txt").read_text().splitlines()
    if line.startswith("ray[")
)


def cluster_yamls() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def launcher_configs() -> list[Path]:
    return [p for p in cluster_yamls() if "kuberay" not in p.parts]


def kuberay_manifests() -> list[Path]:
    return [p for p in cluster_yamls() if "kuberay" in p.parts]


def ray_validate(cfg: dict) -> dict:
    """Ray's offline validation of a cluster launcher config; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def launcher_problems(cfg: dict) -> list[str]:
    """What raygd needs from a launcher config beyond Ray's schema (the issue's list)."""
    problems = []
    types = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    workers = {name: t for name, t in types.items() if name != head}
    if head not in types:
        problems.append("head_node_type names no node type")
    if not any(t.get("resources", {}).get("GPU", 0) >= 1 for t in workers.values()):
        problems.append("no GPU worker type")
    if not any(t.get("resources", {}).get("GPU", 0) == 0 for t in workers.values()):
        problems.append("no CPU worker type")
    for name, t in workers.items():
        if t.get("min_workers", 0) != 0 or t.get("max_workers", 0) < 1:
            problems.append(f"worker type {name} must autoscale from 0 to N >= 1")
    if not cfg.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be > 0")
    setup = " ".join(cfg.get("setup_commands", []))
    if "-r ~/raygd/requirements.txt" not in setup or "-e ~/raygd" not in setup:
        problems.append("setup_commands must install requirements.txt and raygd")
    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    worker_start = " ".join(cfg.get("worker_start_ray_commands", []))
    if "cluster/mlflow-server.sh" not in head_start or "MLFLOW_TRACKING_URI" not in head_start:
        problems.append("head_start_ray_commands must start MLflow and export MLFLOW_TRACKING_URI")
    if "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" not in worker_start:
        problems.append("workers must know the head's MLflow server")
    for where, cmds in (("head", head_start), ("worker", worker_start)):
        if "RAY_AUTH_MODE=token" not in cmds:
            problems.append(f"{where} start commands must turn on token auth")
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("the head's dashboard must bind to 127.0.0.1")
    if "~/.ray/raygd-cluster.token" not in cfg.get("file_mounts", {}):
        problems.append("file_mounts must carry the cluster token to every node")
    head_setup = cfg.get("head_setup_commands", [])
    installs = [i for i, c in enumerate(head_setup) if re.search(r"apt-get install .*\bpostgresql\b", c)]
    sets_up = [i for i, c in enumerate(head_setup) if "cluster/postgres-setup.sh" in c]
    if not installs or not sets_up or sets_up[0] < installs[0]:
        problems.append("head_setup_commands must install PostgreSQL (apt-get) and then run cluster/postgres-setup.sh")
    return problems


@pytest.mark.parametrize("path", launcher_configs(), ids=lambda p: p.name)
def test_launcher_config_passes_rays_validator_and_raygds_needs(path):
    cfg = yaml.safe_load(path.read_text())
    prepared = ray_validate(cfg)
    assert prepared["provider"]["type"] in ("aws", "gcp")
    assert launcher_problems(cfg) == []


def test_every_yaml_under_cluster_is_checked():
    names = {p.name for p in cluster_yamls()}
    assert {"aws.yaml", "aws-minimal.yaml", "gcp.yaml"} <= names
    assert {"raycluster.yaml", "rayjob-sweep.yaml", "mlflow.yaml", "postgres.yaml"} <= {
        p.name for p in kuberay_manifests()
    }


def test_requirements_pin_the_postgresql_driver_that_mlflows_sqlalchemy_uses():
    """The nodes and the KubeRay image install requirements.txt: the MLflow server's store needs psycopg."""
    from sqlalchemy.engine import make_url

    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("psycopg")]
    assert pins and all(re.fullmatch(r"psycopg\[binary\]==[\d.]+", p) for p in pins), pins
    for uri in [*store_uris(all_kuberay_docs()), "postgresql+psycopg://mlflow@127.0.0.1:5432/mlflow"]:
        assert make_url(uri).get_dialect().driver == "psycopg", uri
    assert set(launcher_configs()) | set(kuberay_manifests()) == set(cluster_yamls())


def _drop_worker_resources(c):
    del c["available_node_types"]["cpu_worker"]["resources"]


def _set(path: str, value):
    def mutate(c):
        *parents, last = path.split(".")
        for key in parents:
            c = c[key]
        c[last] = value

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        _drop_worker_resources,
        _set("max_workers", "many"),
        _set("max_worker", 3),  # a typo: unknown top-level key
        _set("idle_timeout_minutes", -1),
        _set("available_node_types.gpu_worker.resources", {"GPU": 0.5}),  # resources are integers
        _set("available_node_types.cpu_worker.min_worker", 0),  # a typo inside a node type
        _set("provider", {"region": "us-west-2"}),  # no provider type
    ],
)
def test_broken_launcher_config_fails_rays_validator(mutate):
    cfg = yaml.safe_load((CLUSTER / "aws-minimal.yaml").read_text())
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)):
        ray_validate(cfg)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (_set("available_node_types.gpu_worker.min_workers", 1), "autoscale from 0"),
        (_set("available_node_types.gpu_worker.resources", {"CPU": 4}), "no GPU worker type"),
        (_set("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"]), "token auth"),
        (_set("setup_commands", ["pip install ray"]), "requirements.txt"),
        (_set("head_setup_commands", ['pip install "boto3>=1.34"']), "install PostgreSQL"),
        (
            _set("head_setup_commands", ["bash ~/raygd/cluster/postgres-setup.sh", "apt-get install -y postgresql"]),
            "install PostgreSQL",
        ),
    ],
)
def test_broken_launcher_config_fails_raygds_checks(mutate, problem):
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    mutate(cfg)
    ray_validate(cfg)  # still a valid Ray config: only raygd's own checks catch these
    assert any(problem in p for p in launcher_problems(cfg))


# --- KubeRay --------------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_spec_problems(where: str, template: dict) -> list[str]:
    containers = (template.get("spec") or {}).get("containers") or []
    if not containers:
        return [f"{where}: template.spec.containers is empty"]
    return [
        f"{where}: container {c.get('name')} needs name and image"
        for c in containers
        if not c.get("name") or not c.get("image")
    ]


def raycluster_problems(doc: dict) -> list[str]:
    spec, problems = doc.get("spec") or {}, []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name missing")
    if spec.get("rayVersion") != RAY_PIN:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} differs from the pin {RAY_PIN}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if not (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0) > 0:
        problems.append("autoscalerOptions.idleTimeoutSeconds must be > 0")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec with rayStartParams missing")
    else:
        problems += _pod_spec_problems("headGroupSpec", head.get("template") or {})
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            problems.append("the head must be reachable only inside the cluster (ClusterIP, no ingress)")
    groups = spec.get("workerGroupSpecs") or []
    for g in groups:
        name = g.get("groupName")
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas", 0)
        if not name or not isinstance(g.get("rayStartParams"), dict):
            problems.append(f"worker group {name!r} needs groupName and rayStartParams")
        if lo != 0 or not isinstance(hi, int) or hi < 1 or not 0 <= n <= hi:
            problems.append(f"worker group {name!r} must autoscale from minReplicas 0 to maxReplicas >= 1")
        problems += _pod_spec_problems(f"worker group {name!r}", g.get("template") or {})
    gpu = [
        g
        for g in groups
        for c in g.get("template", {}).get("spec", {}).get("containers", [])
        if "nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})
    ]
    if not gpu or len(gpu) == len(groups):
        problems.append("needs a CPU and a GPU worker group")
    return problems


def rayjob_problems(doc: dict, cluster_names: set[str]) -> list[str]:
    spec, problems = doc.get("spec") or {}, []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    words = str(spec.get("entrypoint", "")).split()
    if words[:2] != ["raygd", "sweep"] or len(words) < 3 or words[2] not in PRESETS:
        problems.append(f"entrypoint must run a raygd sweep preset ({sorted(PRESETS)}), got {words[:3]}")
    if "tracking.tracking_uri=http://raygd-mlflow:5000" not in words:
        problems.append("entrypoint must log to the namespace's MLflow server")
    selected = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
    if selected not in cluster_names and "rayClusterSpec" not in spec:
        problems.append(f"clusterSelector {selected!r} names no RayCluster here and there is no rayClusterSpec")
    if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"):
        problems.append(f"submissionMode {spec.get('submissionMode')!r} is unknown")
    submitter = spec.get("submitterPodTemplate") or {}
    env = {e["name"] for c in submitter.get("spec", {}).get("containers", []) for e in c.get("env", [])}
    if not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env:
        problems.append("the submitter needs the cluster's token (RAY_AUTH_MODE, RAY_AUTH_TOKEN)")
    return problems


def kuberay_problems(docs: list[dict]) -> list[str]:
    """Problems of a set of KubeRay manifests: every object well-formed, RayClusters and RayJobs complete."""
    problems = []
    for d in docs:
        if not d.get("apiVersion") or not d.get("kind") or not (d.get("metadata") or {}).get("name"):
            problems.append(f"object without apiVersion/kind/metadata.name: {str(d)[:80]}")
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    names = {(d.get("metadata") or {}).get("name") for d in clusters}
    for d in clusters:
        problems += [f"RayCluster: {p}" for p in raycluster_problems(d)]
    for d in docs:
        if d.get("kind") == "RayJob":
            problems += [f"RayJob: {p}" for p in rayjob_problems(d, names)]
    services = {d["metadata"]["name"] for d in docs if d.get("kind") == "Service"}
    if "raygd-mlflow" not in services:
        problems.append("no Service raygd-mlflow: the jobs' MLflow server")
    return problems + secret_problems(docs) + mlflow_store_problems(docs)


SECRET_ENV = re.compile(r"(PASSWORD|TOKEN|SECRET)$")
DB_SECRET = "raygd-mlflow-db"


def containers(doc: dict) -> list[dict]:
    """Every container of a Deployment / StatefulSet / Pod manifest (init containers too)."""
    spec = doc.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or spec
    return list(pod.get("containers") or []) + list(pod.get("initContainers") or [])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def secret_problems(docs: list[dict]) -> list[str]:
    """A password, token or secret in an env var must come from a Secret (secretKeyRef), never a literal."""
    return [
        f"{d['kind']} {d['metadata']['name']}: env {name} is a literal, not a secretKeyRef"
        for d in docs
        for c in containers(d)
        for name, e in _env(c).items()
        if SECRET_ENV.search(name) and "secretKeyRef" not in (e.get("valueFrom") or {})
    ]


def _secret_of(env_var: dict | None) -> str | None:
    """The Secret an env var's value comes from (``valueFrom.secretKeyRef.name``), or None."""
    return (((env_var or {}).get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")


def store_uris(docs: list[dict]) -> list[str]:
    return [
        a.split("=", 1)[1]
        for d in docs
        for c in containers(d)
        for a in c.get("args") or []
        if str(a).startswith("--backend-store-uri=")
    ]


def mlflow_store_problems(docs: list[dict]) -> list[str]:
    """MLflow's store is the namespace's PostgreSQL: password from the Secret, reached only by MLflow."""
    problems = []
    by = {(d.get("kind"), (d.get("metadata") or {}).get("name")): d for d in docs}
    mlflow, postgres = by.get(("Deployment", "raygd-mlflow")), by.get(("Deployment", "raygd-postgres"))
    if mlflow is None or postgres is None:
        return ["needs the Deployments raygd-mlflow and raygd-postgres"]
    uris = store_uris([mlflow])
    if len(uris) != 1 or not uris[0].startswith("postgresql+psycopg://mlflow@raygd-postgres:5432/"):
        problems.append(f"MLflow's --backend-store-uri must be the raygd-postgres database, without a password: {uris}")
    env = {n: e for c in containers(mlflow) for n, e in _env(c).items()}
    if _secret_of(env.get("PGPASSWORD")) != DB_SECRET:
        problems.append(f"MLflow needs PGPASSWORD from the Secret {DB_SECRET}")
    pg = next(iter(containers(postgres)), {})
    pg_env = _env(pg)
    if _secret_of(pg_env.get("POSTGRES_PASSWORD")) != DB_SECRET:
        problems.append(f"PostgreSQL needs POSTGRES_PASSWORD from the Secret {DB_SECRET}")
    if (pg_env.get("POSTGRES_HOST_AUTH_METHOD") or {}).get("value", "scram-sha-256") == "trust":
        problems.append("PostgreSQL must ask for a password (POSTGRES_HOST_AUTH_METHOD is trust)")
    listen = [a for a in pg.get("args") or [] if str(a).startswith("listen_addresses=")]
    if listen != ["listen_addresses=$(POD_IP),127.0.0.1"]:
        problems.append(f"PostgreSQL must listen on the pod IP and 127.0.0.1 only, got {listen}")
    service = by.get(("Service", "raygd-postgres"))
    if service is None or (service.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append("needs the ClusterIP Service raygd-postgres")
    policy = by.get(("NetworkPolicy", "raygd-postgres"))
    only_mlflow = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "raygd-mlflow"}}}]
    if policy is None or [r.get("from") for r in policy["spec"].get("ingress", [])] != [only_mlflow]:
        problems.append("the NetworkPolicy raygd-postgres must admit the MLflow pods only")
    return problems


def all_kuberay_docs() -> list[dict]:
    return [d for p in kuberay_manifests() for d in load_docs(p)]


def test_kuberay_manifests_have_what_a_raycluster_and_a_rayjob_need():
    docs = all_kuberay_docs()
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy"}
    assert kuberay_problems(docs) == []


def _kind(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind)


def _named(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(docs: list[dict], deployment: str) -> dict:
    return containers(_named(docs, "Deployment", deployment))[0]


def _set_arg(docs: list[dict], deployment: str, arg: str) -> None:
    c = _container(docs, deployment)
    flag = arg.split("=", 1)[0]
    c["args"] = [arg if str(a).startswith(flag + "=") else a for a in c["args"]]


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda ds: _kind(ds, "RayCluster").update(apiVersion="ray.io/v1alpha1"), "not ray.io/v1"),
        (lambda ds: _kind(ds, "RayCluster")["spec"].pop("headGroupSpec"), "headGroupSpec"),
        (lambda ds: _kind(ds, "RayCluster")["spec"]["workerGroupSpecs"][0].update(minReplicas=3), "minReplicas 0"),
        (lambda ds: _kind(ds, "RayCluster")["spec"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
        (lambda ds: _kind(ds, "RayCluster")["spec"].pop("authOptions"), "authOptions"),
        (lambda ds: _kind(ds, "RayCluster")["spec"].update(rayVersion="2.9.0"), "differs from the pin"),
        (
            lambda ds: _kind(ds, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop(
                "image"
            ),
            "needs name and image",
        ),
        (
            lambda ds: _kind(ds, "RayJob")["spec"].update(clusterSelector={"ray.io/cluster": "other"}),
            "names no RayCluster",
        ),
        (lambda ds: _kind(ds, "RayJob")["spec"].update(entrypoint="raygd sweep no-such-preset"), "raygd sweep preset"),
        (lambda ds: _kind(ds, "RayJob").update(apiVersion="ray.io/v1beta1"), "not ray.io/v1"),
        (lambda ds: _kind(ds, "Service")["metadata"].update(name="mlflow"), "raygd-mlflow"),
        (
            lambda ds: _container(ds, "raygd-postgres")["env"].append(
                {"name": "POSTGRES_PASSWORD", "value": "hunter2"}
            ),
            "literal",
        ),
        (
            lambda ds: _container(ds, "raygd-mlflow").update(
                env=[e for e in _container(ds, "raygd-mlflow")["env"] if e["name"] != "PGPASSWORD"]
            ),
            "PGPASSWORD",
        ),
        (lambda ds: _set_arg(ds, "raygd-mlflow", "--backend-store-uri=sqlite:////data/mlflow.db"), "backend-store-uri"),
        (
            lambda ds: _set_arg(
                ds, "raygd-mlflow", "--backend-store-uri=postgresql+psycopg://mlflow:pw@raygd-postgres:5432/m"
            ),
            "without a password",
        ),
        (lambda ds: _container(ds, "raygd-postgres").update(args=["-c", f"{LISTEN}=*"]), "listen on the pod IP"),
        (
            lambda ds: _container(ds, "raygd-postgres")["env"].append(
                {"name": "POSTGRES_HOST_AUTH_METHOD", "value": "trust"}
            ),
            "ask for a password",
        ),
        (
            lambda ds: _named(ds, "NetworkPolicy", "raygd-postgres")["spec"]["ingress"][0].__setitem__(
                "from", [{"podSelector": {}}]
            ),
            "MLflow pods only",
        ),
        (lambda ds: _named(ds, "Service", "raygd-postgres")["metadata"].update(name="db"), "raygd-postgres"),
    ],
)
def test_broken_kuberay_manifests_fail(mutate, problem):
    docs = copy.deepcopy(all_kuberay_docs())
    mutate(docs)
    assert any(problem in p for p in kuberay_problems(docs)), kuberay_problems(docs)


# --- nothing open to the internet ------------------------------------------------------------------------------

ANY4 = r"0\.0\.0\.0"  # written as a pattern so that this file does not itself contain the address
LISTEN = "listen" + "_addresses"  # PostgreSQL's bind setting, split for the same reason
SCANNED_SUFFIXES = {".yaml", ".yml", ".json", ".sh", ".py", ".toml", ".cfg", ".ini", ".env", ".md", ".txt"}
SCANNED_NAMES = {"Makefile", "Dockerfile", "Procfile"}
TEXT_RULES = [
    ("the whole IPv4 internet or all interfaces", re.compile(ANY4)),
    ("the whole IPv6 internet", re.compile(r":{2}/0")),
    (
        "a bind to all IPv6 interfaces or any host",
        re.compile(
            r"(--host|--dashboard-host|--bind|dashboard[-_]host|\bhost)[\"']?\s*[,=: ]\s*[\"']?"
            r"(:{2}|\[:{2}\]|\*)([\"'\s:,\]]|$)"
        ),
    ),
    ("PostgreSQL listening on all interfaces", re.compile(LISTEN + r"\s*[=:]?\s*[\"']?[^\"'\n]*\*")),
]
EXPOSED_SERVICE_TYPES = ("LoadBalancer", "NodePort")


def scanned_files() -> list[Path]:
    """Every file of the repository (tracked, or new and not ignored) that can hold a config or a server start."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    files = [REPO / f for f in listed]
    return sorted(
        f
        for f in files
        if f.is_file() and (f.suffix in SCANNED_SUFFIXES or f.name in SCANNED_NAMES or f.name.startswith("Dockerfile"))
    )


def exposure_findings(name: str, text: str) -> list[str]:
    """Lines that would expose a service to the internet, and Kubernetes objects that publish one."""
    found = [
        f"{name}:{i}: {why}: {line.strip()[:100]}"
        for i, line in enumerate(text.splitlines(), 1)
        for why, rule in TEXT_RULES
        if rule.search(line)
    ]
    if name.endswith((".yaml", ".yml")):
        try:
            docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except yaml.YAMLError as err:
            return [*found, f"{name}: not valid YAML ({err})"]
        for d in docs:
            kind, spec = d.get("kind"), d.get("spec") or {}
            if kind == "Service" and spec.get("type") in EXPOSED_SERVICE_TYPES:
                found.append(f"{name}: Service {d['metadata']['name']} is type {spec['type']}")
            if kind in ("Ingress", "Gateway", "Route"):
                found.append(f"{name}: {kind} {d['metadata']['name']} publishes a service")
            if kind == "RayCluster":
                head = spec.get("headGroupSpec") or {}
                if head.get("serviceType") in EXPOSED_SERVICE_TYPES or head.get("enableIngress"):
                    found.append(f"{name}: RayCluster head service is published")
            if re.search(r"hostNetwork:\s*true|hostPort:", yaml.safe_dump(d)):
                found.append(f"{name}: {kind} uses the node's network (hostNetwork/hostPort)")
            if "head_start_ray_commands" in d:
                start = " ".join(d["head_start_ray_commands"])
                host = re.search(r"--dashboard-host[= ](\S+)", start)
                if host and host.group(1) not in ("127.0.0.1", "localhost"):
                    found.append(f"{name}: dashboard bound to {host.group(1)}")
    return found


def test_no_config_or_code_default_exposes_dashboard_jobs_api_or_mlflow():
    files = scanned_files()
    names = {str(f.relative_to(REPO)) for f in files}
    assert {
        "Makefile",
        "cluster/aws.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/mlflow-server.sh",
        "cluster/postgres-setup.sh",
        "cluster/kuberay/postgres.yaml",
        "tests/pgserver.py",
        "cluster/kuberay/Dockerfile",
        "raygd/cli.py",
        "tests/localray.py",
        "README.md",
    } <= names
    findings = [f for path in files for f in exposure_findings(str(path.relative_to(REPO)), path.read_text())]
    assert findings == []


URI_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]+:(?![$*{])[^\s@/'\"]+@")


def credential_findings(name: str, text: str) -> list[str]:
    """Database URIs with a password written in, and secret env vars with literal values."""
    found = [
        f"{name}:{i}: a password in a URI: {URI_PASSWORD.search(line).group(0)[:40]}"
        for i, line in enumerate(text.splitlines(), 1)
        if URI_PASSWORD.search(line)
    ]
    if name.endswith((".yaml", ".yml")):
        found += [f"{name}: {p}" for p in secret_problems([d for d in yaml.safe_load_all(text) if isinstance(d, dict)])]
    return found


def test_no_credentials_in_cluster_configs_or_scripts():
    """The cluster's passwords are generated on the head or come from Kubernetes Secrets: none is in the repo."""
    files = [f for f in scanned_files() if f.relative_to(REPO).parts[0] in ("cluster", "configs")]
    assert {"cluster/postgres-setup.sh", "cluster/kuberay/postgres.yaml"} <= {str(f.relative_to(REPO)) for f in files}
    assert [f for path in files for f in credential_findings(str(path.relative_to(REPO)), path.read_text())] == []


@pytest.mark.parametrize(
    "name, text, bad",
    [
        ("run.sh", "mlflow server --backend-store-uri postgresql://mlflow:hunter2@127.0.0.1:5432/mlflow\n", True),
        ("k.yaml", "args: [--backend-store-uri=postgresql+psycopg://mlflow:s3cret@raygd-postgres:5432/mlflow]\n", True),
        (
            "k.yaml",
            "kind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers:\n"
            "        - {name: c, env: [{name: POSTGRES_PASSWORD, value: hunter2}]}\n",
            True,
        ),
        ("run.sh", "mlflow server --backend-store-uri postgresql+psycopg://mlflow@127.0.0.1:5432/mlflow\n", False),
        ("run.sh", 'uri="postgresql://mlflow:$PASSWORD@127.0.0.1/mlflow"\n', False),
    ],
)
def test_credential_scan_flags_a_written_in_password(name, text, bad):
    assert bool(credential_findings(name, text)) == bad


EVERYWHERE = ".".join(["0"] * 4)


@pytest.mark.parametrize(
    "name, text",
    [
        ("cluster/x.yaml", f"head_start_ray_commands: ['ray start --head --dashboard-host={EVERYWHERE}']\n"),
        ("cluster/x.yaml", "head_start_ray_commands: ['ray start --head --dashboard-host=10.0.0.4']\n"),
        (
            "cluster/x.yaml",
            f"provider:\n  security_group:\n    IpPermissions:\n      - IpRanges: [{{CidrIp: {EVERYWHERE}/0}}]\n",
        ),
        ("Makefile", f"ui:\n\tmlflow ui --host {EVERYWHERE} --port 5000\n"),
        ("run.sh", f"mlflow server --host {':' * 2} --port 5000\n"),
        ("raygd/x.py", f'ray.init(dashboard_host="{EVERYWHERE}")\n'),
        ("raygd/x.py", 'subprocess.Popen(["mlflow", "server", "--host", "{}"])\n'.format("*")),
        ("k.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: m}\nspec: {type: LoadBalancer}\n"),
        ("k.yaml", "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: m}\nspec: {}\n"),
        (
            "k.yaml",
            "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: r}\nspec:\n  headGroupSpec: "
            "{serviceType: NodePort}\n",
        ),
        ("k.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: true}\n"),
        ("setup.sh", f"psql -c \"ALTER SYSTEM SET {LISTEN} = '*'\"\n"),
        ("k.yaml", f'args: ["-c", "{LISTEN}=$(POD_IP),*"]\n'),
    ],
)
def test_exposure_scan_flags_a_deliberately_exposed_copy(name, text):
    assert exposure_findings(name, text) != []


@pytest.mark.parametrize(
    "name, text",
    [
        ("run.sh", "mlflow server --host 127.0.0.1 --port 5000\n"),
        ("run.sh", 'mlflow server --host "$PRIVATE_IP" --gunicorn-opts "--bind 127.0.0.1:5000"\n'),
        ("k.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: m}\nspec: {type: ClusterIP}\n"),
        ("setup.sh", "psql -c \"ALTER SYSTEM SET listen_addresses = '127.0.0.1'\"\n"),
        ("k.yaml", 'args: ["-c", "listen_addresses=$(POD_IP),127.0.0.1"]\n'),
    ],
)
def test_exposure_scan_passes_loopback_and_private_binds(name, text):
    assert exposure_findings(name, text) == []


def test_fake_multinode_config_of_the_autoscaling_bench_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    from bench.autoscale import fake_cluster_config

    validate_config(fake_cluster_config("127.0.0.1:6379", max_nodes=2, idle_timeout_s=10))


# --- the head's scripts, run for real: PostgreSQL setup, then MLflow on it ---------------------------------------

SUDO_SHIM = """#!/bin/bash
# sudo for the test (we are root): `sudo -u USER CMD` runs CMD as USER, `sudo CMD` runs CMD
if [ "$1" = -u ]; then user="$2"; shift 2; exec runuser -u "$user" -- "$@"; fi
exec "$@"
"""


def _head_env(pg, home: Path, marker: str) -> dict[str, str]:
    """What the head's scripts see: sudo, and Debian's pg_lsclusters/pg_ctlcluster for the throwaway cluster."""
    shims = home / "shims"
    shims.mkdir(parents=True)
    (shims / "sudo").write_text(SUDO_SHIM)
    (shims / "pg_lsclusters").write_text(f'#!/bin/bash\necho "15 test {pg.port} online postgres {pg.data} {pg.log}"\n')
    (shims / "pg_ctlcluster").write_text(
        f'#!/bin/bash\nexec runuser -u postgres -- {pg.bin}/pg_ctl -D {pg.data} -l {pg.log} -w "$3"\n'
    )
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return {
        **os.environ,
        "HOME": str(home),
        "PATH": os.pathsep.join([str(shims), str(pg.bin), str(BIN), os.environ["PATH"]]),
        "PGHOST": str(pg.root),
        "PGPORT": str(pg.port),
        MARKER_VAR: marker,
    }


def test_head_scripts_set_up_a_loopback_postgresql_with_a_generated_password_and_start_mlflow_on_it(tmp_path):
    """cluster/postgres-setup.sh (twice: ray up reruns it) against a real PostgreSQL cluster as Debian makes it
    (superuser postgres, peer auth on the socket, listen_addresses 'localhost'), then cluster/mlflow-server.sh; a
    run logged over HTTP lands in the database. Only the root of this machine can run PostgreSQL as postgres."""
    psycopg = pytest.importorskip("psycopg")
    if os.geteuid() != 0:
        pytest.skip("the scripts use sudo -u postgres; this test stands in for it with runuser, as root only")
    try:
        pg = PostgresServer(user="postgres", local_auth="peer", listen="localhost").start()
    except PostgresUnavailable as err:
        pytest.skip(str(err))
    home, marker = tmp_path / "home", uuid.uuid4().hex
    env = _head_env(pg, home, marker)
    try:
        runs = [
            subprocess.run(
                ["bash", str(CLUSTER / "postgres-setup.sh")], env=env, capture_output=True, text=True, timeout=120
            )
            for _ in range(2)
        ]
        assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
        uri = f"postgresql+psycopg://mlflow@127.0.0.1:{pg.port}/mlflow"
        assert [r.stdout.splitlines()[-1] for r in runs] == [uri, uri]
        assert (home / "mlflow" / "backend-store-uri").read_text().strip() == uri
        pgpass = home / ".pgpass"
        assert pgpass.stat().st_mode & 0o777 == 0o600
        entries = [line.split(":") for line in pgpass.read_text().splitlines()]
        assert len(entries) == 1 and entries[0][:4] == ["127.0.0.1", str(pg.port), "mlflow", "mlflow"]
        password = entries[0][4]
        assert re.fullmatch(r"[0-9a-f]{48}", password)
        assert all(password not in r.stdout + r.stderr for r in runs)
        libpq_uri = uri.replace("+psycopg", "")
        with psycopg.connect(libpq_uri, passfile=str(pgpass)) as conn:
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)  # was 'localhost'
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(libpq_uri, passfile=os.devnull, connect_timeout=5).close()

        port = free_port()
        started = subprocess.run(
            ["bash", str(CLUSTER / "mlflow-server.sh"), str(port)], env=env, capture_output=True, text=True, timeout=120
        )
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip().endswith(f":{port}")
        url, log = f"http://127.0.0.1:{port}", home / "mlflow" / "server.log"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        from raygd.tracking import Tracker, create_run

        run_id = create_run(url, "head-scripts", "probe", {"p": 1}, {})
        Tracker(url, run_id, enabled=True).log_metrics({"train/loss": 0.5}, step=3)
        with psycopg.connect(libpq_uri, passfile=str(pgpass)) as conn:
            assert conn.execute(
                "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'train/loss'", (run_id,)
            ).fetchall() == [(3, 0.5)]
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in marked_pids(marker)]
        assert cmdlines and not any(password.encode() in c for c in cmdlines)
    finally:
        kill_marked(marker)
        pg.stop()
        pg.remove_files()
