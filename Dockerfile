# The project on the official Ray image, installed from its lock file (requirements/constraints.txt).
#   GPU: docker build -t REGISTRY/mirnet-restore:0.1.0-gpu .
#   CPU: docker build --build-arg FLAVOUR=cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#          -t REGISTRY/mirnet-restore:0.1.0-cpu .
# The Ray version must match the lock file's (a test checks it) and the cluster's.
ARG RAY_VERSION=2.60.0
ARG FLAVOUR=gpu
FROM rayproject/ray:${RAY_VERSION}-py311-${FLAVOUR}

# Where torch comes from: by default the CUDA 12.8 build; the CPU build for the CPU flavour.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Made by the image's user (ray), so the install below can write beside the sources.
RUN mkdir -p /home/ray/mirnet-restore
WORKDIR /home/ray/mirnet-restore

# torch first (the lock file leaves its build to the installer), then the project with every
# other dependency pinned by the lock file.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch>=2.4"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users requirements/ requirements/
COPY --chown=ray:users models/ models/
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users jobs/ jobs/
RUN pip install --no-cache-dir -c requirements/constraints.txt . \
 && mirnet models > /dev/null

# Compiled kernels (--compile) are cached on local disk and shared by the replicas of a node.
ENV TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    MIRNET_CACHE=/home/ray/.cache/mirnet-restore
