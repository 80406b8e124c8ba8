"""The Kubernetes manifests a shipped bundle carries: deploy/kubernetes as it is, plus
`site/resources.yaml`, the runtime's memory sized from the bundle's measured peak. On the
site, `install.sh --registry` writes `site/kustomization.yaml` beside it, pinning the images
it pushed by digest."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from services.core.bundle import Bundle

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
# The base's figures (deploy/kubernetes/base/runtime.yaml) come from the same rule applied to
# the default bundle's peak; a bundle without a measurement keeps them.
BASE_MEMORY = ("576Mi", "768Mi")


def memory_from_peak(peak_rss_mb: float) -> tuple[str, str]:
    """Request and limit for the runtime container from the peak resident memory measured
    while evaluating the served GGUF: half again for longer contexts than the evaluation's
    and the allocator's slack, and a limit at twice the peak; in 64 Mi steps."""
    request = math.ceil(peak_rss_mb * 1.5 / 64) * 64
    limit = math.ceil(peak_rss_mb * 2.0 / 64) * 64
    return f"{request}Mi", f"{limit}Mi"


def served_peak_mb(bundle_dir: Path) -> float | None:
    """The evaluation's peak memory for the bundle's default GGUF; None when not measured."""
    manifest = Bundle.open(bundle_dir, verify=False).manifest
    report = bundle_dir / "eval.json"
    if not report.is_file():
        return None
    quant = next((q for q, path in manifest.models.items() if path == manifest.default_model), "")
    for row in json.loads(report.read_text()).get("students", []):
        if row.get("quantization") == quant and row["label"].startswith("distilled"):
            peak = row.get("peak_rss_mb")
            return float(peak) if peak else None
    return None


def resources_patch(peak_mb: float | None) -> str:
    request, limit = BASE_MEMORY if peak_mb is None else memory_from_peak(peak_mb)
    source = (
        "not measured (no evaluation in the bundle): the base's figures"
        if peak_mb is None
        else f"from the evaluation's peak of {peak_mb:.0f} MB for the default GGUF"
    )
    return f"""# The runtime's memory, {source}: request 1.5x, limit 2x.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: edgedistill-runtime
spec:
  template:
    spec:
      containers:
        - name: runtime
          resources:
            requests: {{memory: {request}}}
            limits: {{memory: {limit}}}
"""


def write_manifests(bundle_dir: Path, out: Path) -> Path:
    shutil.copytree(MANIFESTS, out)
    (out / "site").mkdir()
    (out / "site" / "resources.yaml").write_text(resources_patch(served_peak_mb(bundle_dir)))
    return out
