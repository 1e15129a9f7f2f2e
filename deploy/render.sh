#!/usr/bin/env bash
# Regenerate the KubeRay samples in this folder from the job specs in jobs/ (a test checks
# they are current): bash deploy/render.sh [OUT_DIR]. Run from the project root.
set -euo pipefail
out="${1:-deploy}"
archive=(--set params.SRC=s3://my-archive/scans --set params.DST=s3://my-archive/restored/denoise)
mirnet jobs render jobs/nightly-restore.yaml --kuberay "${archive[@]}" -o "$out/nightly-restore.raycronjob.yaml"
mirnet jobs render jobs/nightly-restore.yaml --kuberay --kind RayJob "${archive[@]}" -o "$out/restore.rayjob.yaml"
mirnet jobs render jobs/nightly-restore.yaml --kuberay --kind RayCluster --set name=mirnet-restore \
  -o "$out/raycluster.yaml"
mirnet jobs render jobs/train-denoise.yaml --kuberay --set params.OUT=s3://my-models/runs \
  -o "$out/train-denoise.rayjob.yaml"
