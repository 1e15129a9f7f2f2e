#!/usr/bin/env bash
# Nightly restoration of an archive prefix on a running Ray cluster (see cluster.yaml).
# Submitted with (SRC and DST are required; the job's runtime env carries them):
#   ray job submit --address http://HEAD:8265 --working-dir . \
#     --runtime-env-json '{"env_vars": {"SRC": "s3://archive/scans", "DST": "s3://archive/restored/denoise"}}' \
#     -- bash jobs/restore_archive.sh
# Every image format is listed; files the engine cannot read (.gif, .heic, ...) become failed rows.
# Reruns resume: inputs with an ok manifest row and an existing output are skipped (counted in
# DST/_manifest/runs/RUN.json, without a row each).
# Exit 1: some images failed (see DST/_manifest/); 4: storage unreachable; 5: the previous run
# still holds DST's lease, so this one did nothing.
set -euo pipefail
: "${SRC:?set SRC to the archive prefix to restore}" "${DST:?set DST to the prefix to write into}"
exec mirnet restore "$SRC" "$DST" --task denoise --address auto --quiet --images-per-batch 16 --batch-size 8
