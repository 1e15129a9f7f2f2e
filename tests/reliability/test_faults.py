"""Storage faults never lose or corrupt an image: jobs run against moto's S3 through a fault-injecting proxy.

The proxy (``tests/helpers/fault_proxy.py``) sits on 127.0.0.1 between the pipeline (driver
and Ray workers, through ``--storage-options {"endpoint_url": proxy}``) and the session's
moto server. It answers 500 / 503 SlowDown, resets or closes connections, drops the
connection after the request took effect upstream, delays, and truncates response bodies
(cut short of their Content-Length, or well framed but incomplete).
Every job is compared with a fault-free reference run of the same job straight to moto.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
import uuid
import zlib
from base64 import b64encode
from collections import Counter

import boto3
import pytest
import s3fs
from botocore.config import Config
from botocore.exceptions import ClientError
from click.testing import CliRunner

from pipeline import codecs
from pipeline.cli import main
from pipeline.manifest import read_run_summaries
from pipeline.storage import Storage

from ..conftest import free_port
from ..helpers.fault_proxy import FaultProxy, only_object_reads
from ..test_pipeline import manifest_rows, photo_files, upload

# Per request: 24% of requests fail before or after reaching moto, or are delayed; on top,
# 12% of the responses with a body are truncated. About 30% of all requests see a fault.
MIXED = {"error500": .04, "slowdown503": .04, "reset": .04, "close": .04, "drop_after": .04, "delay": .04,
         "truncate": .12}
TILING = ["--tile", "64", "--overlap", "8"]


@pytest.fixture
def proxy(s3_endpoint, bucket):
    """A proxy in front of moto; faults are drawn as if the random bucket name were always the same."""
    with FaultProxy(s3_endpoint, seed=20261129, delay=0.2, aliases={bucket: "bucket"}) as running:
        yield running


def direct_fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def restore(src: str, dst: str, model: str, executor: str, endpoint: str | None = None, *extra: str):
    """``mirnet restore`` in this process; ``endpoint`` (the proxy) for driver and workers alike."""
    args = ["restore", src, dst, "--model", model, "--executor", executor, "--quiet", *TILING, *extra]
    if endpoint:
        args += ["--storage-options", json.dumps({"endpoint_url": endpoint})]
    return CliRunner().invoke(main, args)


def objects(fs: s3fs.S3FileSystem, root: str) -> dict[str, bytes]:
    """Every object under ``root`` except the run's bookkeeping (``_manifest*``), by relative key."""
    fs.invalidate_cache()
    keys = [p[len(root) + 1:] for p in fs.find(root)]
    return {k: fs.cat_file(f"{root}/{k}") for k in keys if not k.split("/", 1)[0].startswith("_")}


def assert_no_image_lost_or_corrupted(fs, bucket: str, files: dict[str, bytes], out: str, reference: str) -> None:
    """Each input restored exactly once, ok, byte-identical to the fault-free run; inputs untouched."""
    rows = manifest_rows(f"s3://{bucket}/{out}")
    statuses = Counter((r["key"], r["status"]) for r in rows)
    assert not [r for r in rows if r["status"] != "ok"], [(r["key"], r["error_class"], r["error_message"])
                                                          for r in rows if r["status"] != "ok"]
    assert statuses == Counter({(key, "ok"): 1 for key in files}), "an image was lost or recorded twice"
    assert all(r["output_key"] == r["key"] for r in rows)
    restored, expected = objects(fs, f"{bucket}/{out}"), objects(fs, f"{bucket}/{reference}")
    assert sorted(restored) == sorted(files), "missing or stray objects in the output prefix"
    for key in files:
        assert restored[key] == expected[key], f"{key}: output differs from the fault-free run"
        image = codecs.decode(restored[key], key)
        original = codecs.decode(files[key], key)
        assert (image.width, image.height, image.mode) == (original.width, original.height, original.mode)
    assert objects(fs, f"{bucket}/in") == files, "an input object was changed"


def report(name: str, proxy: FaultProxy, images: int, seconds: float) -> dict:
    stats = proxy.stats()
    share = stats["total_faults"] / max(stats["requests"], 1)
    print(f"\n{name}: {images} images in {seconds:.1f}s; {stats['requests']} requests "
          f"({stats['methods']}), {stats['forwarded']} forwarded, {stats['total_faults']} faults "
          f"({share:.0%}): {stats['faults']}")
    return stats


# -- the proxy itself --------------------------------------------------------------------------------------------

def test_proxy_forwards_signed_requests_that_moto_verifies(s3_endpoint, bucket, proxy):
    """With moto checking SigV4 signatures, s3fs works through the proxy (faults and retries included)."""
    from moto.core.authorization import enable_iam_authentication

    iam = boto3.client("iam", endpoint_url=s3_endpoint)
    user = f"faults-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    data = photo_files(1)["set0/deep/img00.png"]
    proxy.configure({"error500": .05, "reset": .05, "drop_after": .05, "truncate": .1})
    with enable_iam_authentication():
        fs = s3fs.S3FileSystem(key=key["AccessKeyId"], secret=key["SecretAccessKey"], endpoint_url=proxy.url,
                               skip_instance_cache=True)
        for i in range(6):
            fs.pipe_file(f"{bucket}/signed/{i}.png", data)
            assert fs.cat_file(f"{bucket}/signed/{i}.png") == data
        assert fs.cat_file(f"{bucket}/signed/0.png", start=0, end=100) == data[:100]
        assert len(fs.find(f"{bucket}/signed")) == 6
        fs.rm_file(f"{bucket}/signed/0.png")
        assert fs.info(f"{bucket}/signed/1.png")["size"] == len(data)
        assert proxy.total_faults > 0, "no fault was injected: the retried requests were not re-verified"
        # The control: moto does check signatures here (a wrong secret is refused through the proxy).
        with proxy.faults_off():
            forged = s3fs.S3FileSystem(key=key["AccessKeyId"], secret="not-the-secret", endpoint_url=proxy.url,
                                       skip_instance_cache=True)
            with pytest.raises(Exception, match="SignatureDoesNotMatch|signature"):
                forged.pipe_file(f"{bucket}/signed/forged.png", b"x")
    assert not direct_fs(s3_endpoint).exists(f"{bucket}/signed/forged.png")


def test_proxy_forwards_chunked_and_aws_chunked_bodies(s3_endpoint, bucket, proxy):
    """A Transfer-Encoding: chunked body is de-chunked; an aws-chunked payload reaches moto byte for byte.

    Over plain HTTP, s3fs/aiobotocore send put_object as one Content-Length body with an
    x-amz-checksum-crc32 header (aws-chunked trailers are only used over TLS), so these
    framings are built by hand here.
    """
    host, port = proxy.url.rsplit("/", 1)[-1].split(":")
    data = bytes(range(256)) * 40 + b"tail"

    def put(key: str, headers: dict[str, str], chunks: list[bytes]) -> int:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("PUT", f"/{bucket}/{key}", body=iter(chunks), headers=headers, encode_chunked=True)
        status = conn.getresponse().status
        conn.close()
        return status

    assert put("plain-chunked.bin", {}, [data[:1000], data[1000:5000], data[5000:]]) == 200
    crc = b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    framed = (b"%x\r\n" % 4000 + data[:4000] + b"\r\n" + b"%x\r\n" % (len(data) - 4000) + data[4000:] + b"\r\n"
              + b"0\r\n" + f"x-amz-checksum-crc32:{crc}\r\n\r\n".encode())
    aws_chunked = {"Content-Encoding": "aws-chunked", "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                   "x-amz-decoded-content-length": str(len(data)), "x-amz-trailer": "x-amz-checksum-crc32"}
    assert put("aws-chunked.bin", aws_chunked, [framed[:777], framed[777:]]) == 200
    fs = direct_fs(s3_endpoint)
    assert fs.cat_file(f"{bucket}/plain-chunked.bin") == data
    assert fs.cat_file(f"{bucket}/aws-chunked.bin") == data
    assert proxy.forwarded == proxy.requests == 2


def test_proxy_faults_look_like_s3_and_are_counted(s3_endpoint, bucket, proxy):
    client = boto3.client("s3", endpoint_url=proxy.url, config=Config(retries={"total_max_attempts": 1}))
    client.put_object(Bucket=bucket, Key="k", Body=b"0123456789" * 10)
    assert client.head_object(Bucket=bucket, Key="k")["ContentLength"] == 100  # HEAD keeps the object's size
    for kind, code in (("error500", "InternalError"), ("slowdown503", "SlowDown")):
        proxy.configure({kind: 1.0})
        with pytest.raises(ClientError) as caught:
            client.get_object(Bucket=bucket, Key="k")
        assert caught.value.response["Error"]["Code"] == code
    proxy.configure({"truncate": 1.0})
    host, port = proxy.url.rsplit("/", 1)[-1].split(":")
    signed = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", signed.split(port, 1)[1])
    response = conn.getresponse()
    assert response.getheader("Content-Length") == "100"
    with pytest.raises(http.client.IncompleteRead) as short:
        response.read()
    assert len(short.value.partial) == 50
    proxy.configure({"reset": 1.0})
    with proxy.faults_off():
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"0123456789" * 10
    assert proxy.faults == Counter({"error500": 1, "slowdown503": 1, "truncate": 1})
    assert proxy.requests == 6 and proxy.forwarded == 4
    # stop() closes the listening socket and the open keep-alive connections.
    kept = http.client.HTTPConnection(host, int(port), timeout=10)
    with proxy.faults_off():
        kept.request("GET", signed.split(port, 1)[1])
        assert kept.getresponse().read() == b"0123456789" * 10
    proxy.stop()
    try:
        assert kept.sock.recv(1) == b""
    except ConnectionResetError:
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2)


# -- jobs ----------------------------------------------------------------------------------------------------------

def run_with_mixed_faults(s3_endpoint, bucket, proxy, model: str, executor: str, count: int):
    """Restore ``count`` photos (plus one 16-bit PNG) once straight to moto, as the reference, then
    through the proxy with MIXED faults; checks nothing was lost. Returns (files, src, fs, stats)."""
    files = photo_files(count, size=64)
    fs = direct_fs(s3_endpoint)
    upload(fs, f"{bucket}/in", files)
    src = f"s3://{bucket}/in"
    reference = restore(src, f"s3://{bucket}/reference", model, executor)
    assert reference.exit_code == 0, reference.output

    proxy.configure(MIXED)
    start = time.perf_counter()
    result = restore(src, f"s3://{bucket}/out", model, executor, proxy.url)
    stats = report(f"{executor}, mixed faults", proxy, len(files), time.perf_counter() - start)
    assert result.exit_code == 0, result.output
    assert_no_image_lost_or_corrupted(fs, bucket, files, "out", "reference")
    return files, src, fs, stats


@pytest.mark.slow
def test_mixed_faults_inline_lose_no_image(s3_endpoint, bucket, proxy, small_model):
    files, src, fs, stats = run_with_mixed_faults(s3_endpoint, bucket, proxy, small_model, "inline", 47)  # 48 images
    assert all(stats["faults"].get(kind, 0) >= 2 for kind in MIXED), f"fault kinds left out: {stats['faults']}"
    assert stats["total_faults"] >= 0.15 * stats["requests"], stats
    assert stats["forwarded"] < stats["requests"], "no request was refused before reaching moto"
    hit = {target.split("?")[0] for _, _, target in proxy.events}
    assert len(hit & {f"/{bucket}/in/{k}" for k in files}) >= 5, "faults missed the image reads"
    assert len(hit & {f"/{bucket}/out/{k}" for k in files}) >= 5, "faults missed the image writes"

    # A rerun through the same faults skips every image: still one ok row and one output per input.
    again = restore(src, f"s3://{bucket}/out", small_model, "inline", proxy.url)
    assert again.exit_code == 0, again.output
    rows = manifest_rows(f"s3://{bucket}/out")
    assert Counter(r["key"] for r in rows if r["status"] == "ok") == Counter(list(files))
    assert len(rows) == len(files), "the rerun recorded rows although it skipped everything"
    assert read_run_summaries(Storage(f"s3://{bucket}/out"))[-1]["skipped"] == len(files)


@pytest.mark.slow
def test_mixed_faults_ray_lose_no_image(s3_endpoint, bucket, proxy, small_model, ray_runtime):
    proxy.seed = 1  # this small job draws ~27% faults with it (the fixture's seed happens to draw only 15%)
    files, _, _, stats = run_with_mixed_faults(s3_endpoint, bucket, proxy, small_model, "ray", 11)  # 12 images
    # The workers went through the proxy: it saw every image read and write, and faulted some of both.
    assert all(proxy.seen["GET", f"/{bucket}/in/{k}"] and proxy.seen["PUT", f"/{bucket}/out/{k}"] for k in files)
    faulted = {(method, target.split("?")[0]) for _, method, target in proxy.events}
    assert any(m in ("GET", "HEAD") and t in {f"/{bucket}/in/{k}" for k in files} for m, t in faulted), faulted
    assert any(m == "PUT" and t in {f"/{bucket}/out/{k}" for k in files} for m, t in faulted), faulted
    assert stats["total_faults"] >= 0.15 * stats["requests"], stats


@pytest.mark.slow
def test_truncated_reads_never_give_a_corrupt_output_or_an_ok_row(s3_endpoint, bucket, proxy, small_model):
    files = photo_files(11, size=64)  # 12 images
    fs = direct_fs(s3_endpoint)
    upload(fs, f"{bucket}/in", files)
    src = f"s3://{bucket}/in"
    reference = restore(src, f"s3://{bucket}/reference", small_model, "inline")
    assert reference.exit_code == 0, reference.output

    # Half of all image reads come back cut in half: retried, every image restored intact.
    proxy.configure({"truncate": 0.5}, only=only_object_reads(bucket, "in"))
    start = time.perf_counter()
    result = restore(src, f"s3://{bucket}/out", small_model, "inline", proxy.url)
    report("truncated reads (50%)", proxy, len(files), time.perf_counter() - start)
    assert proxy.faults["truncate"] >= 3, proxy.faults
    assert result.exit_code == 0, result.output
    assert_no_image_lost_or_corrupted(fs, bucket, files, "out", "reference")

    # Two images whose every read is cut just before its end (a JPEG decodes almost anything).
    victims = {"set1/img01.jpg", "set2/img05.png"}
    assert victims <= set(files)
    wanted = {f"/{bucket}/in/{k}" for k in victims}
    proxy.reset_counts()
    proxy.truncate_fraction = 0.97
    proxy.configure({"truncate": 1.0}, only=lambda method, target: method == "GET" and target in wanted)
    start = time.perf_counter()
    result = restore(src, f"s3://{bucket}/out-cut", small_model, "inline", proxy.url)
    report("truncated reads (100% of two images)", proxy, len(files), time.perf_counter() - start)
    assert result.exit_code == 1, result.output
    rows = {r["key"]: r for r in manifest_rows(f"s3://{bucket}/out-cut")}
    assert sorted(rows) == sorted(files)
    for key in victims:
        assert rows[key]["status"] == "failed", rows[key]
        # Failed at the read: the short body never reached the decoder.
        assert rows[key]["error_class"] != "CodecError", rows[key]
    assert all(rows[k]["status"] == "ok" for k in files if k not in victims)
    assert sorted(objects(fs, f"{bucket}/out-cut")) == sorted(set(files) - victims)
    assert proxy.faults["truncate"] >= 2 * len(victims), "the failing reads were not retried"


@pytest.mark.slow
def test_well_framed_short_reads_are_caught_by_the_checksum(s3_endpoint, bucket, proxy, small_model):
    """A body cut short with a Content-Length that matches the cut: only S3's CRC32 can tell, and does."""
    files = photo_files(2, size=64)  # 3 images, uploaded by s3fs with an x-amz-checksum-crc32
    fs = direct_fs(s3_endpoint)
    upload(fs, f"{bucket}/in", files)
    proxy.truncate_fraction = 0.97
    proxy.configure({"short": 1.0}, only=only_object_reads(bucket, "in"))
    start = time.perf_counter()
    result = restore(f"s3://{bucket}/in", f"s3://{bucket}/out", small_model, "inline", proxy.url)
    report("well-framed short reads (100%)", proxy, len(files), time.perf_counter() - start)
    assert result.exit_code == 1, result.output
    rows = manifest_rows(f"s3://{bucket}/out")
    assert sorted(r["key"] for r in rows) == sorted(files)
    for row in rows:
        assert row["status"] == "failed", row
        assert "checksum" in row["error_message"].lower(), row  # caught at the read, not by the decoder
    assert objects(fs, f"{bucket}/out") == {}
    assert proxy.faults["short"] >= 2 * len(files), "the failing reads were not retried"


@pytest.mark.slow
@pytest.mark.parametrize("dead", ["closed port", "resets every connection"])
def test_dead_endpoint_exits_4_with_one_line(s3_endpoint, bucket, small_model, dead):
    """Nothing listening, or an endpoint that resets every connection: exit 4, one 'storage error:' line."""
    with FaultProxy(s3_endpoint, rates={"reset": 1.0}) as resetting:
        url = resetting.url if dead == "resets every connection" else f"http://127.0.0.1:{free_port()}"
        start = time.perf_counter()
        result = restore(f"s3://{bucket}/in", f"s3://{bucket}/out", small_model, "inline", url)
        seconds = time.perf_counter() - start
    attempts = f"{resetting.requests} connection attempts" if resetting.requests else "connections refused"
    print(f"\ndead endpoint ({dead}): exit {result.exit_code} after {seconds:.1f}s, {attempts}; output:\n"
          f"{result.output}")
    assert result.exit_code == 4, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("storage error:")]
    assert len(errors) == 1, result.output
    assert url.split("//")[1] in errors[0], "the message does not name the endpoint"
    assert "Traceback" not in result.output
    if dead == "resets every connection":
        assert resetting.forwarded == 0 and resetting.requests == resetting.faults["reset"] > 0


# A short outage: the same request fails 8 times in a row, then storage answers again. Every
# storage call of a run should ride it out as image reads do (with_retries over botocore's retries).
OUTAGE = 8


@pytest.mark.slow
@pytest.mark.parametrize("request_kind", ["image read", "manifest listing"])
def test_a_short_outage_on_any_one_request_loses_no_image(s3_endpoint, bucket, proxy, small_model, request_kind):
    files = photo_files(3, size=64)
    fs = direct_fs(s3_endpoint)
    upload(fs, f"{bucket}/in", files)
    failing = {"image read": lambda method, target: method == "GET" and target == f"/{bucket}/in/set1/img01.jpg",
               "manifest listing": lambda method, target: method == "GET" and "list-type=2" in target
               and "prefix=out%2F_manifest%2F&" in target}[request_kind]
    proxy.configure({"error500": 1.0}, only=failing, limit=OUTAGE)
    result = restore(f"s3://{bucket}/in", f"s3://{bucket}/out", small_model, "inline", proxy.url)
    assert proxy.faults["error500"] > 0, "the outage did not hit the request it was meant for"
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert proxy.faults["error500"] == OUTAGE
    assert sorted(r["key"] for r in manifest_rows(f"s3://{bucket}/out") if r["status"] == "ok") == sorted(files)
