"""deploy/: the RayService manifests, their kustomize overlays, the Serve config in them, the images.

Everything is checked offline: the manifests against KubeRay's CRD schemas (deploy/schemas/kuberay,
converted by tests/manifest_checks.py), ``serveConfigV2`` against ``ray_config.yaml`` and Ray's
``ServeDeploySchema``, the overlays as ``kubectl kustomize`` renders them, the Dockerfiles with a
linter of our own (and hadolint too where it is installed).
"""

import base64
import importlib
import importlib.util
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.launcher import SERVE_LATENCY_ENV
from tests.manifest_checks import (
    OBJECT_META,
    K8sValidator,
    crd_validator,
    errors,
    k8s_to_jsonschema,
    lint_dockerfile,
    unsupported_rules,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ("cpu-demo", "gpu-prod")
SECRET = "flowprefill-redis"

_spec = importlib.util.spec_from_file_location("render_serve_config", DEPLOY / "render_serve_config.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)


def _schema(name: str) -> dict:
    return json.loads((DEPLOY / "schemas" / "kuberay" / f"{name}_v1.openapi.json").read_text())


RAYSERVICE = _schema("rayservice")
RAYSERVICE_VALIDATOR = crd_validator(RAYSERVICE)
# a RayService's rayClusterConfig is a RayCluster's spec: check it against that CRD too
RAYCLUSTER_SPEC_VALIDATOR = K8sValidator(k8s_to_jsonschema(_schema("raycluster")["properties"]["spec"]))
_CLUSTER = RAYSERVICE["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
POD_TEMPLATE = k8s_to_jsonschema(_CLUSTER["headGroupSpec"]["properties"]["template"])
SERVICE = k8s_to_jsonschema(RAYSERVICE["properties"]["spec"]["properties"]["serveService"])
# No schemas for core kinds here: a Deployment's pod template and a Service reuse the CRD's
# embedded PodTemplateSpec and Service schemas; the rest of Deployment and Secret is written out.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
DEPLOYMENT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "apps/v1"}, "kind": {"const": "Deployment"}, "metadata": OBJECT_META,
        "spec": {"type": "object", "required": ["selector", "template"], "additionalProperties": False,
                 "properties": {"replicas": {"type": "integer", "minimum": 0}, "template": POD_TEMPLATE,
                                "selector": {"type": "object", "required": ["matchLabels"],
                                             "additionalProperties": False, "properties": {"matchLabels": _STRINGS}}}}}}
SECRET_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata"], "additionalProperties": False,
    "properties": {"apiVersion": {"const": "v1"}, "kind": {"const": "Secret"}, "metadata": OBJECT_META,
                   "type": {"type": "string"}, "data": _STRINGS, "stringData": _STRINGS}}
OTHER_KINDS = {"Service": K8sValidator(SERVICE), "Deployment": K8sValidator(DEPLOYMENT),
               "Secret": K8sValidator(SECRET_SCHEMA)}


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize(directory: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered here")
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(KUBE / "overlays" / name) for name in OVERLAYS}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def validate(doc: dict) -> list[str]:
    if doc["kind"] == "RayService":
        return errors(RAYSERVICE_VALIDATOR, doc) + errors(RAYCLUSTER_SPEC_VALIDATOR, doc["spec"]["rayClusterConfig"])
    return errors(OTHER_KINDS[doc["kind"]], doc)


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def app_args(config: dict) -> dict:
    return next(a for a in config["applications"] if a["name"] == "flowprefill")["args"]


def resolve(path: str) -> object:
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------------------------ schemas
def test_the_converter_honours_the_kubernetes_extensions():
    v = K8sValidator(k8s_to_jsonschema({
        "type": "object", "properties": {
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "n": {"type": "integer", "format": "int32"}, "t": {"type": "string", "nullable": True},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "res": {"type": "object", "x-kubernetes-embedded-resource": True},
            "m": {"type": "string", "x-kubernetes-validations": [{"rule": "self in ['a', 'b']"},
                                                                 {"rule": "self == oldSelf"}]},
            "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["p"],
                      "items": {"type": "object", "properties": {"p": {"type": "integer"}}}},
            "set": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}}))
    good = {"q": "500m", "n": 3, "t": None, "open": {"zzz": 1}, "res": {"apiVersion": "v1", "kind": "Pod"},
            "m": "a", "ports": [{"p": 1}, {"p": 2}], "set": ["x", "y"]}
    assert errors(v, good) == []
    bad = {"q": 0.5, "n": 2**40, "typo": 1, "res": {"kind": "Pod"}, "m": "c", "ports": [{"p": 1}, {"p": 1}],
           "set": ["x", "x"]}
    assert {e.split(":")[0] for e in errors(v, bad)} == {"q", "n", "<root>", "res", "m", "ports", "set"}
    assert list(unsupported_rules(RAYSERVICE)) == []  # only rules the converter knows about


def test_every_base_manifest_validates():
    for path in (KUBE / "base" / "rayservice.yaml", KUBE / "base" / "redis.yaml"):
        for doc in load_all(path):
            assert validate(doc) == [], f"{path.name} {doc['kind']}"
    bad = load_all(KUBE / "base" / "rayservice.yaml")[0]
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1  # misspelt
    assert len(validate(bad)) == 4  # each found by both CRDs


def test_overlays_render_and_validate(rendered):
    for name, docs in rendered.items():
        assert sorted(d["kind"] for d in docs) == ["Deployment", "RayService", "Secret", "Service"], name
        for doc in docs:
            assert validate(doc) == [], f"{name}: {doc['kind']}"


# ------------------------------------------------------------------------------ serveConfigV2
def test_serve_configs_are_generated_from_ray_config_yaml(rendered):
    assert render.stale() == [], "run: python deploy/render_serve_config.py"
    base = one(load_all(KUBE / "base" / "rayservice.yaml"), "RayService")
    assert base["spec"]["serveConfigV2"] == render.render_text("base")
    local = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    assert serve_config(base) == render.deep_merge(local, render.KUBERNETES)  # no other difference
    for name, docs in rendered.items():
        assert one(docs, "RayService")["spec"]["serveConfigV2"] == render.render_text(name)
        changed = app_args(serve_config(one(docs, "RayService")))
        assert {k for k in changed if changed[k] != app_args(local)[k]} == set(render.VARIANTS[name])


def test_serve_configs_are_valid_serve_configs_and_every_import_path_resolves(rendered):
    from ray.serve.schema import ServeDeploySchema

    from cluster.app import REQUEST_ROUTER_CLASS, AppConfig
    from cluster.autoscaling import serve_autoscaling_config

    configs = {"base": serve_config(one(load_all(KUBE / "base" / "rayservice.yaml"), "RayService"))}
    configs |= {name: serve_config(one(docs, "RayService")) for name, docs in rendered.items()}
    for name, config in configs.items():
        schema = ServeDeploySchema.model_validate(config)
        assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000, name
        paths = [app.import_path for app in schema.applications] + list(schema.grpc_options.grpc_servicer_functions)
        args = AppConfig.from_args({**app_args(config), "redis_url": None})
        paths.append(REQUEST_ROUTER_CLASS)
        if args.autoscaling is not None:
            paths.append(serve_autoscaling_config(args.autoscaling)["policy"]["policy_function"])
        for path in paths:
            assert callable(resolve(path)), f"{name}: {path}"
    gpu = app_args(configs["gpu-prod"])
    assert (gpu["replica_gpus"], gpu["engine"]["device"], gpu["engine"]["dtype"]) == (1.0, "cuda", "bfloat16")
    assert app_args(configs["base"])["autoscaling"] is None  # the default stays a fixed num_replicas


# ----------------------------------------------------------------------------- cluster layout
def _gpus(container: dict) -> float:
    return float(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _cpus(quantity: str | int) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_head_does_no_replica_work_and_exposes_serve_and_metrics(rendered):
    import ray

    pinned = f"ray[serve]=={ray.__version__}"
    assert pinned in (ROOT / "pyproject.toml").read_text()
    for name, docs in rendered.items():
        spec = one(docs, "RayService")["spec"]
        cluster = spec["rayClusterConfig"]
        assert cluster["rayVersion"] == ray.__version__
        assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0", name
        (container,) = head["template"]["spec"]["containers"]
        assert _gpus(container) == 0
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000 and ports["grpc"] == 9000
        assert {p["port"] for p in spec["serveService"]["spec"]["ports"]} == {8000, 9000}
        notes = head["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == ports["serve"]
        assert notes["prometheus.io/path"] == "/metrics"
        assert serve_config(one(docs, "RayService"))["proxy_location"] == "HeadOnly"


def test_worker_groups_fit_every_replica_serve_may_ask_for(rendered):
    for name, docs in rendered.items():
        cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
        args = app_args(serve_config(one(docs, "RayService")))
        (group,) = cluster["workerGroupSpecs"]
        (container,) = group["template"]["spec"]["containers"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        cpus, gpus = _cpus(container["resources"]["limits"]["cpu"]), _gpus(container)
        assert float(group["rayStartParams"].get("num-gpus", "0")) == gpus
        per_pod = math.floor(cpus / args["replica_cpus"])
        if args["replica_gpus"]:
            assert gpus == args["replica_gpus"] == 1, f"{name}: one replica per GPU"
            per_pod = min(per_pod, math.floor(gpus / args["replica_gpus"]))
        assert per_pod >= 1 and cpus >= args["replica_cpus"] + 0.25  # a replica and the router ingress
        wanted = (args["autoscaling"] or {}).get("max_replicas", args["num_replicas"])
        assert group["maxReplicas"] * per_pod >= wanted, name
    assert _gpus(one(rendered["gpu-prod"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
                 ["template"]["spec"]["containers"][0]) == 1


def test_ray_pods_read_redis_url_from_the_secret_and_images_are_pinned(rendered):
    for name, docs in rendered.items():
        secret = one(docs, "Secret")
        assert secret["metadata"]["name"] == SECRET
        host_port = base64.b64decode(secret["data"]["REDIS_URL"]).decode().split("//")[1].split("/")[0]
        service, redis = one(docs, "Service"), one(docs, "Deployment")
        assert host_port == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        pod_labels = redis["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert redis["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for template in templates:
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container["env"]}
                assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "REDIS_URL"}
                for flag, value in SERVE_LATENCY_ENV.items():  # the same Serve loop settings as `serve`
                    assert env[flag]["value"] == value, f"{name}: {flag}"
                assert container["image"].endswith("-" + name.split("-")[0]), f"{name}: {container['image']}"
        images = [c["image"] for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]
                  ["containers"]] + [c["image"] for t in templates for c in t["spec"]["containers"]]
        for image in images:
            tag = image.rsplit("/", 1)[-1]
            assert ":" in tag and not tag.endswith(":latest"), image


def test_optional_components_render(tmp_path):
    rel = Path("..") / Path(*[".."] * (len(tmp_path.parts) - 1)) / KUBE.relative_to("/")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(rel / "overlays" / "gpu-prod")],
        "components": [str(rel / "components" / "external-redis"), str(rel / "components" / "podmonitor")]}))
    docs = kustomize(tmp_path)
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "RayService"]  # Redis is external: the user's Secret
    assert validate(one(docs, "RayService")) == []
    monitor, head = one(docs, "PodMonitor"), one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    labels = head["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]
    assert all(labels.get(k) == v for k, v in selector["matchLabels"].items())
    assert any(labels[e["key"]] in e["values"] for e in selector["matchExpressions"])
    ports = {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


# --------------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfiles_pass_the_lint_and_install_like_the_readme(flavour):
    text = (DEPLOY / "docker" / f"Dockerfile.{flavour}").read_text()
    assert lint_dockerfile(text) == []
    assert "scripts/bootstrap.sh" in text and "torch==2.13.0" in text
    assert ("nvidia/cuda:" in text and "whl/cu" in text) if flavour == "gpu" else "whl/cpu" in text
    if shutil.which("hadolint"):
        out = subprocess.run(["hadolint", "--failure-threshold", "warning", "-"], input=text, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout


def test_the_dockerfile_lint_catches_what_it_claims():
    bad = "\n".join([
        "FROM python:latest", "ADD https://example.com/x.tgz /x", "WORKDIR app",
        "RUN apt-get update && apt-get install curl", "RUN curl -s x | sh", "RUN sudo pip install foo",
        "EXPOSE 8000", "CMD flowprefill serve",
    ])
    codes = {p.split("[")[1].split("]")[0] for p in lint_dockerfile(bad)}
    assert codes == {"DL3006/DL3007", "DL3020", "DL3000", "DL3014", "DL3015", "DL3009", "DL4006", "DL3004",
                     "DL3042", "DL3025", "DL3002", "EXPOSE"}
    assert any("missing ports [9000]" in p for p in lint_dockerfile(bad))
    assert lint_dockerfile("ARG BASE\nFROM ${BASE}\nUSER app\nEXPOSE 8000 9000")[0].endswith("not pinned to a tag "
                                                                                        "or digest other than latest")
