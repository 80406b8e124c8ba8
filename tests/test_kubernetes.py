"""The Kubernetes manifests: every overlay renders with `kubectl kustomize`, validates against
Kubernetes' OpenAPI schemas (1.29 and the newest the validator knows), and has the properties
the deployment relies on."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.processes import REPO

KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())
RUNTIME, ROUTER = "edgedistill-runtime", "edgedistill-router"


def render(folder: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (match,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return match


def pod(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(objects, "Deployment", name)["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUBE / "overlays" / request.param)


def test_the_overlays_are_cpu_and_gpu() -> None:
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: tuple[str, list[dict[str, Any]]], version: str
) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    for obj in rendered[1]:
        kubernetes_validate.validate(
            obj, latest_version() if version == "latest" else version, strict=True
        )


def test_the_validation_catches_a_misspelled_field() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    deployment = find(render(KUBE / "overlays" / "cpu"), "Deployment", RUNTIME)
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grcp"] = probe.pop("grpc")
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, "1.29.0", strict=True)


def test_probes_are_grpc_probes_on_the_serving_port(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    objects = rendered[1]
    for name, port in ((RUNTIME, 50051), (ROUTER, 50052)):
        (container,) = pod(objects, name)["containers"]
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        # Ready means the service can answer (the runtime's model loaded).
        assert container["readinessProbe"]["grpc"]["service"] == "edgedistill.v1.Inference"


def test_the_routers_http_api_is_served_published_and_allowed(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """The port the router is told to serve HTTP on is its container's `http` port, the
    Service's, and one its network policy lets in."""
    objects = rendered[1]
    (container,) = pod(objects, ROUTER)["containers"]
    told = {e["name"]: e.get("value") for e in container["env"]}["EDGEDISTILL_ROUTER_HTTP_PORT"]
    port = int(told)
    assert {"name": "http", "containerPort": port} in container["ports"]
    service = find(objects, "Service", ROUTER)["spec"]["ports"]
    assert any(p["targetPort"] == "http" for p in service)
    allowed = find(objects, "NetworkPolicy", ROUTER)["spec"]["ingress"]
    assert any({"protocol": "TCP", "port": port} in rule["ports"] for rule in allowed)


def test_pods_run_hardened(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    for name in (RUNTIME, ROUTER):
        spec = pod(rendered[1], name)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert {"requests", "limits"} <= set(container["resources"]), container["name"]
            assert "memory" in container["resources"]["limits"]


def test_runtimes_sit_behind_a_headless_service_the_router_balances_over(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    objects = rendered[1]
    headless = find(objects, "Service", "edgedistill-runtime-headless")
    assert headless["spec"]["clusterIP"] == "None"
    runtime_labels = pod_labels(objects, RUNTIME)
    assert headless["spec"]["selector"].items() <= runtime_labels.items()
    (router,) = pod(objects, ROUTER)["containers"]
    env = {e["name"]: e.get("value") for e in router["env"]}
    assert env["EDGEDISTILL_ROUTER_LOCAL"] == (
        '["dns:///edgedistill-runtime-headless.$(POD_NAMESPACE).svc.cluster.local:50051"]'
    )
    assert list(env).index("POD_NAMESPACE") < list(env).index("EDGEDISTILL_ROUTER_LOCAL")


def pod_labels(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    labels: dict[str, str] = find(objects, "Deployment", name)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def test_the_network_policy_isolates_the_runtimes(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    objects = rendered[1]
    policy = find(objects, "NetworkPolicy", RUNTIME)["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(objects, RUNTIME).items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == []  # runtimes reach nothing
    grpc_rules = [r for r in policy["ingress"] if {"protocol": "TCP", "port": 50051} in r["ports"]]
    assert len(grpc_rules) == 1
    (source,) = grpc_rules[0]["from"]
    assert source["podSelector"]["matchLabels"].items() <= pod_labels(objects, ROUTER).items()
    assert "namespaceSelector" not in source

    router = find(objects, "NetworkPolicy", ROUTER)["spec"]
    assert "Egress" in router["policyTypes"]
    for rule in router["egress"]:  # runtimes and DNS only: no API until a site allows it
        assert all("ipBlock" not in peer for peer in rule["to"])


def test_the_autoscaler_and_disruption_budgets_target_the_right_pods(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    objects = rendered[1]
    hpa = find(objects, "HorizontalPodAutoscaler", RUNTIME)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RUNTIME}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    for name in (RUNTIME, ROUTER):
        budget = find(objects, "PodDisruptionBudget", name)["spec"]
        assert budget["selector"]["matchLabels"].items() <= pod_labels(objects, name).items()


def test_the_gpu_overlay_gives_each_runtime_a_gpu() -> None:
    objects = render(KUBE / "overlays" / "gpu")
    (runtime,) = pod(objects, RUNTIME)["containers"]
    assert runtime["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in runtime["env"]}
    assert env["EDGEDISTILL_N_GPU_LAYERS"] == "-1"
    (router,) = pod(objects, ROUTER)["containers"]
    assert "nvidia.com/gpu" not in router["resources"]["limits"]


def test_the_runtime_memory_follows_the_bundles_measured_peak(tmp_path: Path) -> None:
    import json

    from services.builder.kube import BASE_MEMORY, memory_from_peak, write_manifests
    from services.core.bundle import Bundle
    from testkit.bundles import CAPITALS_PROGRAM, make_bundle
    from testkit.processes import smollm2_gguf

    assert memory_from_peak(363.3) == ("576Mi", "768Mi")
    assert memory_from_peak(2000) == ("3008Mi", "4032Mi")
    (runtime,) = pod(render(KUBE / "overlays" / "cpu"), RUNTIME)["containers"]
    base = runtime["resources"]
    assert (base["requests"]["memory"], base["limits"]["memory"]) == BASE_MEMORY

    bundle = make_bundle(tmp_path / "bundle", smollm2_gguf(), CAPITALS_PROGRAM)
    quant = next(iter(Bundle.open(bundle).manifest.models), "Q4_1")
    rows = [
        {"label": "untuned student", "quantization": quant, "peak_rss_mb": 9000},
        {"label": f"distilled {quant}", "quantization": quant, "peak_rss_mb": 1000},
    ]
    (bundle / "eval.json").write_text(json.dumps({"students": rows}))
    site = write_manifests(bundle, tmp_path / "kubernetes") / "site"
    (site / "kustomization.yaml").write_text(
        "resources: [../overlays/cpu]\npatches: [{path: resources.yaml}]\n"
    )
    (runtime,) = pod(render(site), RUNTIME)["containers"]
    assert runtime["resources"]["requests"]["memory"] == "1536Mi"
    assert runtime["resources"]["limits"] == {"cpu": "2", "memory": "2048Mi"}
