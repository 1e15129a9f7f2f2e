#!/usr/bin/env bash
# Nightly restoration of an archive prefix on a running Ray cluster (see cluster.yaml).
# Submitted with:  ray job submit --address http://HEAD:8265 --working-dir . -- bash jobs/restore_archive.sh
# Reruns resume: inputs with an ok manifest row and an existing output are skipped.
# Exit 1: some images failed (see DST/_manifest/); 5: the previous run still holds DST's lease,
# so this one did nothing; 4: storage unreachable.
set -euo pipefail
SRC=${SRC:-s3://archive/scans}
DST=${DST:-s3://archive/restored/denoise}
exec mirnet restore "$SRC" "$DST" --task denoise --address auto --quiet \
  --include '*.tif' --include '*.png' --images-per-batch 16 --batch-size 8
