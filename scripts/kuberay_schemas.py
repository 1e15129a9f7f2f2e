"""Extract the OpenAPI schemas of KubeRay's CRDs into tests/data/kuberay/ (for the manifest tests).

Usage: python scripts/kuberay_schemas.py CRD_DIR. Reads ray.io_{rayclusters,rayjobs,raycronjobs}.yaml
(KubeRay's ray-operator/config/crd/bases/) and writes KIND.v1.schema.json.gz for the version the operator
stores: the schema the Kubernetes API server enforces on that kind's objects.
"""
import gzip
import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "kuberay"


def main(crd_dir: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("rayclusters", "rayjobs", "raycronjobs"):
        crd = yaml.safe_load((Path(crd_dir) / f"ray.io_{name}.yaml").read_text())
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("storage"):  # the version the operator stores: ray.io/v1
                continue
            path = OUT / f"{kind}.{version['name']}.schema.json.gz"
            body = json.dumps(version["schema"]["openAPIV3Schema"], sort_keys=True, separators=(",", ":"))
            path.write_bytes(gzip.compress(body.encode(), mtime=0))
            print(path.name, len(body))


if __name__ == "__main__":
    main(sys.argv[1])
