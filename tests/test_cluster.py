"""cluster/: launcher configs pass Ray's own validator, KubeRay manifests have what a RayCluster and a
RayJob need, and no config or code default in the repository opens Ray's dashboard, the Jobs API
or MLflow to the internet. Each check is also run on deliberately broken copies, which must fail.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PRESETS = {p.stem for p in (REPO / "tuning" / "presets").glob("*.yaml")}
RAY_PIN = next(line.split("==")[1].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.startswith("ray["))


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
    assert {"raycluster.yaml", "rayjob-sweep.yaml", "mlflow.yaml"} <= {p.name for p in kuberay_manifests()}
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


@pytest.mark.parametrize("mutate", [
    _drop_worker_resources,
    _set("max_workers", "many"),
    _set("max_worker", 3),                                          # a typo: unknown top-level key
    _set("idle_timeout_minutes", -1),
    _set("available_node_types.gpu_worker.resources", {"GPU": 0.5}),  # resources are integers
    _set("available_node_types.cpu_worker.min_worker", 0),           # a typo inside a node type
    _set("provider", {"region": "us-west-2"}),                       # no provider type
])
def test_broken_launcher_config_fails_rays_validator(mutate):
    cfg = yaml.safe_load((CLUSTER / "aws-minimal.yaml").read_text())
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)):
        ray_validate(cfg)


@pytest.mark.parametrize("mutate, problem", [
    (_set("available_node_types.gpu_worker.min_workers", 1), "autoscale from 0"),
    (_set("available_node_types.gpu_worker.resources", {"CPU": 4}), "no GPU worker type"),
    (_set("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"]), "token auth"),
    (_set("setup_commands", ["pip install ray"]), "requirements.txt"),
])
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
    return [f"{where}: container {c.get('name')} needs name and image" for c in containers
            if not c.get("name") or not c.get("image")]


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
    gpu = [g for g in groups for c in g.get("template", {}).get("spec", {}).get("containers", [])
           if "nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})]
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
    submitter = (spec.get("submitterPodTemplate") or {})
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
    return problems


def all_kuberay_docs() -> list[dict]:
    return [d for p in kuberay_manifests() for d in load_docs(p)]


def test_kuberay_manifests_have_what_a_raycluster_and_a_rayjob_need():
    docs = all_kuberay_docs()
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy"}
    assert kuberay_problems(docs) == []


def _kind(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind)


@pytest.mark.parametrize("mutate, problem", [
    (lambda ds: _kind(ds, "RayCluster").update(apiVersion="ray.io/v1alpha1"), "not ray.io/v1"),
    (lambda ds: _kind(ds, "RayCluster")["spec"].pop("headGroupSpec"), "headGroupSpec"),
    (lambda ds: _kind(ds, "RayCluster")["spec"]["workerGroupSpecs"][0].update(minReplicas=3), "minReplicas 0"),
    (lambda ds: _kind(ds, "RayCluster")["spec"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
    (lambda ds: _kind(ds, "RayCluster")["spec"].pop("authOptions"), "authOptions"),
    (lambda ds: _kind(ds, "RayCluster")["spec"].update(rayVersion="2.9.0"), "differs from the pin"),
    (lambda ds: _kind(ds, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
     "needs name and image"),
    (lambda ds: _kind(ds, "RayJob")["spec"].update(clusterSelector={"ray.io/cluster": "other"}), "names no RayCluster"),
    (lambda ds: _kind(ds, "RayJob")["spec"].update(entrypoint="raygd sweep no-such-preset"), "raygd sweep preset"),
    (lambda ds: _kind(ds, "RayJob").update(apiVersion="ray.io/v1beta1"), "not ray.io/v1"),
    (lambda ds: _kind(ds, "Service")["metadata"].update(name="mlflow"), "raygd-mlflow"),
])
def test_broken_kuberay_manifests_fail(mutate, problem):
    docs = copy.deepcopy(all_kuberay_docs())
    mutate(docs)
    assert any(problem in p for p in kuberay_problems(docs)), kuberay_problems(docs)


# --- nothing open to the internet ------------------------------------------------------------------------------

ANY4 = r"0\.0\.0\.0"  # written as a pattern so that this file does not itself contain the address
SCANNED_SUFFIXES = {".yaml", ".yml", ".json", ".sh", ".py", ".toml", ".cfg", ".ini", ".env", ".md", ".txt"}
SCANNED_NAMES = {"Makefile", "Dockerfile", "Procfile"}
TEXT_RULES = [
    ("the whole IPv4 internet or all interfaces", re.compile(ANY4)),
    ("the whole IPv6 internet", re.compile(r":{2}/0")),
    ("a bind to all IPv6 interfaces or any host",
     re.compile(r"(--host|--dashboard-host|--bind|dashboard[-_]host|\bhost)[\"']?\s*[,=: ]\s*[\"']?"
                r"(:{2}|\[:{2}\]|\*)([\"'\s:,\]]|$)")),
]
EXPOSED_SERVICE_TYPES = ("LoadBalancer", "NodePort")


def scanned_files() -> list[Path]:
    """Every file of the repository (tracked, or new and not ignored) that can hold a config or a server start."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    files = [REPO / f for f in listed]
    return sorted(f for f in files if f.is_file() and (f.suffix in SCANNED_SUFFIXES or f.name in SCANNED_NAMES
                                                      or f.name.startswith("Dockerfile")))


def exposure_findings(name: str, text: str) -> list[str]:
    """Lines that would expose a service to the internet, and Kubernetes objects that publish one."""
    found = [f"{name}:{i}: {why}: {line.strip()[:100]}" for i, line in enumerate(text.splitlines(), 1)
             for why, rule in TEXT_RULES if rule.search(line)]
    if name.endswith((".yaml", ".yml")):
        try:
            docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except yaml.YAMLError as err:
            return found + [f"{name}: not valid YAML ({err})"]
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
    assert {"Makefile", "cluster/aws.yaml", "cluster/kuberay/raycluster.yaml", "cluster/mlflow-server.sh",
            "cluster/kuberay/Dockerfile", "raygd/cli.py", "tests/localray.py", "README.md"} <= names
    findings = [f for path in files for f in exposure_findings(str(path.relative_to(REPO)), path.read_text())]
    assert findings == []


EVERYWHERE = ".".join(["0"] * 4)


@pytest.mark.parametrize("name, text", [
    ("cluster/x.yaml", f"head_start_ray_commands: ['ray start --head --dashboard-host={EVERYWHERE}']\n"),
    ("cluster/x.yaml", "head_start_ray_commands: ['ray start --head --dashboard-host=10.0.0.4']\n"),
    ("cluster/x.yaml", f"provider:\n  security_group:\n    IpPermissions:\n"
                       f"      - IpRanges: [{{CidrIp: {EVERYWHERE}/0}}]\n"),
    ("Makefile", f"ui:\n\tmlflow ui --host {EVERYWHERE} --port 5000\n"),
    ("run.sh", f"mlflow server --host {':' * 2} --port 5000\n"),
    ("raygd/x.py", f'ray.init(dashboard_host="{EVERYWHERE}")\n'),
    ("raygd/x.py", 'subprocess.Popen(["mlflow", "server", "--host", "%s"])\n' % "*"),
    ("k.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: m}\nspec: {type: LoadBalancer}\n"),
    ("k.yaml", "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: m}\nspec: {}\n"),
    ("k.yaml", "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: r}\nspec:\n  headGroupSpec: "
               "{serviceType: NodePort}\n"),
    ("k.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: true}\n"),
])
def test_exposure_scan_flags_a_deliberately_exposed_copy(name, text):
    assert exposure_findings(name, text) != []


@pytest.mark.parametrize("name, text", [
    ("run.sh", "mlflow server --host 127.0.0.1 --port 5000\n"),
    ("run.sh", 'mlflow server --host "$PRIVATE_IP" --gunicorn-opts "--bind 127.0.0.1:5000"\n'),
    ("k.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: m}\nspec: {type: ClusterIP}\n"),
])
def test_exposure_scan_passes_loopback_and_private_binds(name, text):
    assert exposure_findings(name, text) == []


def test_fake_multinode_config_of_the_autoscaling_bench_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from autoscale import fake_cluster_config
    finally:
        sys.path.remove(str(REPO / "bench"))
    validate_config(fake_cluster_config("127.0.0.1:6379", max_nodes=2, idle_timeout_s=10))
