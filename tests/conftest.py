"""Shared fixtures: real photos, a small model checkpoint, one local Ray runtime, a moto S3 server."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
CONFORMANCE = DATA / "conformance"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This process's environment without its Ray and pytest settings, for a process that starts its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_", "PYTHONBREAKPOINT"))}


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph as uint8 (H, W, 3) or (H, W)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    return img[0] if isinstance(img, tuple) else img


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    """The official-layout MIRNet-v2 fixture re-saved in the project's format as a denoiser."""
    import models

    model = models.load(str(CONFORMANCE / "mirnet_v2_small.pth"))
    path = tmp_path_factory.mktemp("models") / "v2-small.safetensors"
    models.save(model, str(path), task="denoise", name="v2-small")
    return str(path)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; the AWS variables point at it for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint) -> str:
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_runtime(s3_endpoint):
    """One local Ray runtime for the session (started after the S3 variables are set)."""
    import ray

    from pipeline.storage import forwarded_env

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": forwarded_env()})
    yield ray
    ray.shutdown()
