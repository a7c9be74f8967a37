"""The durable broker's object store (scripts/s3rver.js over s3rver), spoken to as Tansu does:
signed requests only, and conditional PUTs that hold under concurrency.

Tansu's s3:// engine updates its metadata objects (producer ids, watermarks, group offsets)
read-modify-write with If-Match / If-None-Match. Stock s3rver ignores both on PUT, so two
concurrent updates both succeeded and one was lost; the fault matrix met it as a producer id
the broker forgot. The last test is that race, made on purpose: it lost updates before the
fix and loses none now.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import threading
import urllib.parse

import pytest

from services.infra import BUCKET, InfraConfig, free_port, servers

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(tmp_path):
    cfg = InfraConfig(state_dir=tmp_path / "state", kafka_port=free_port(), redis_port=free_port(),
                      prometheus_port=free_port(), s3_port=free_port(), ephemeral=False)
    (server,) = servers(cfg, ("s3",))
    server.start()
    try:
        yield cfg
    finally:
        server.stop()


def request(cfg: InfraConfig, method: str, key: str, body: bytes = b"", headers: dict | None = None,
            sign: bool = True) -> tuple[int, dict[str, str], bytes]:
    """One S3 request, signed with AWS Signature V4 (the generated credentials) unless not."""
    path = f"/{BUCKET}/{urllib.parse.quote(key)}"
    host = f"127.0.0.1:{cfg.s3_port}"
    now = dt.datetime.now(dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    hdrs = {"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload,
            **{k.lower(): v for k, v in (headers or {}).items()}}
    if sign:
        key_id, secret = cfg.s3_credentials()
        names = sorted(hdrs)
        canonical = "\n".join([method, path, "", *(f"{n}:{hdrs[n]}" for n in names), "", ";".join(names), payload])
        scope = f"{day}/us-east-1/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        k = f"AWS4{secret}".encode()
        for part in (day, "us-east-1", "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        hdrs["authorization"] = (f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={';'.join(names)}, "
                                 f"Signature={signature}")
    conn = http.client.HTTPConnection("127.0.0.1", cfg.s3_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_unsigned_requests_are_refused(s3):
    assert request(s3, "PUT", "k", b"x")[0] == 200
    assert request(s3, "GET", "k", sign=False)[0] == 403
    assert request(s3, "PUT", "k", b"y", sign=False)[0] == 403
    assert request(s3, "GET", "k")[2] == b"x"


def test_if_none_match_and_if_match_hold(s3):
    status, headers, _ = request(s3, "PUT", "meta.json", b"v1", {"If-None-Match": "*"})
    assert status == 200
    first = headers["etag"]
    assert request(s3, "PUT", "meta.json", b"again", {"If-None-Match": "*"})[0] == 412  # exists: Create fails
    status, headers, _ = request(s3, "PUT", "meta.json", b"v2", {"If-Match": first})
    assert status == 200 and headers["etag"] != first
    assert request(s3, "PUT", "meta.json", b"stale", {"If-Match": first})[0] == 412  # an outdated version
    assert request(s3, "PUT", "missing.json", b"x", {"If-Match": first})[0] == 412
    assert request(s3, "GET", "meta.json")[2] == b"v2"


def test_concurrent_read_modify_writes_lose_no_update(s3):
    """Tansu's OptiCon loop, from 8 threads at once: read (with its ETag), add one, PUT
    If-Match, and on 412 read again. Every increment must land exactly once."""
    request(s3, "PUT", "counter", b"0")
    per_thread, threads = 10, 8
    conflicts = []

    def worker() -> None:
        for _ in range(per_thread):
            while True:
                _, headers, body = request(s3, "GET", "counter")
                status = request(s3, "PUT", "counter", str(int(body) + 1).encode(), {"If-Match": headers["etag"]})[0]
                if status == 200:
                    break
                assert status == 412, status
                conflicts.append(1)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert int(request(s3, "GET", "counter")[2]) == per_thread * threads
    assert conflicts  # the race really happened (and was refused, not lost)
