#!/usr/bin/env bash
# Regenerate requirements/constraints.txt: every runtime, test, bench, geo and medical dependency pinned,
# for each platform and supported Python. torch and its CUDA wheels are left out: the CPU
# or CUDA build is the installer's choice (README, "Set up").
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --extra test --extra bench --extra geo --extra medical --universal --python-version 3.11 \
  --no-emit-package torch --no-emit-package triton --no-emit-package cuda-bindings \
  --no-emit-package cuda-pathfinder --no-emit-package cuda-toolkit \
  $(for p in cublas cuda-cccl cuda-cupti cuda-nvrtc cuda-runtime cudnn-cu13 cufft cufile curand cusolver \
      cusparse cusparselt-cu13 nccl-cu13 nvjitlink nvshmem-cu13 nvtx; do echo --no-emit-package nvidia-$p; done) \
  --custom-compile-command "scripts/lock.sh" -o requirements/constraints.txt "$@"
