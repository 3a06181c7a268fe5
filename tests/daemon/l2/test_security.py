"""L2 credentials and TLS (docs/security.md): a store that wants a password and TLS gets
both, a client without them gets nothing from it (a typed ``L2Unavailable``: the tier
treats the store as down, the daemon goes on), and a cluster's seeds keep their TLS and
ACL user. Tenants sharing a store are ``test_two_daemons.py`` (another salt finds nothing)
and ``test_codec.py`` (keys carry the salt; a value read under another key is foreign).

Real redis-server with TLS (a throwaway CA and certificate made with openssl) and
``requirepass``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis

from tests.daemon.l2.redis_procs import MISSING, REDIS_SERVER
from tests.procs import free_port
from tokencake import protocol as p
from tokencake.daemon.l2.backends import L2Unavailable, RedisBackend, RedisClusterBackend
from tokencake.daemon.l2.codec import block_key, key_prefix, open_value, seal

PASSWORD = "s3cret-pw"


def _certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 signed by it."""
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "k.pem", "c.csr", "c.pem"))

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca), "-days", "1", "-subj", "/CN=tokencake-test-ca")  # fmt: skip
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


@pytest.fixture
def tls_node(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if REDIS_SERVER is None or shutil.which("openssl") is None:
        pytest.skip(MISSING + " (and openssl)")
    ca, cert, key = _certs(tmp_path)
    port = free_port()
    log = (tmp_path / "redis.log").open("ab")
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    try:
        client = redis.Redis(
            host="127.0.0.1", port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(ca)
        )
        for _ in range(300):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.fail("the TLS redis-server did not come up")
        client.close()
        yield port, ca
    finally:
        proc.kill()
        proc.wait()


def _backend(url: str) -> RedisBackend:
    return RedisBackend(url, timeout_s=2.0)


def test_tls_and_password_are_used_and_required(tls_node: tuple[int, Path]) -> None:
    port, ca = tls_node
    key = block_key(key_prefix("ns", "fp", "tenant-a"), b"\x01" * 16)
    value = seal(key, b"kv-bytes" * 64)
    good = _backend(f"rediss://:{PASSWORD}@127.0.0.1:{port}?ssl_ca_certs={ca}")
    try:
        assert good.put_many([(key, value)]) == 1
        (got,) = good.get_many([key])
        assert got is not None and bytes(open_value(key, got)) == b"kv-bytes" * 64
    finally:
        good.close()
    refused = [
        f"rediss://:wrong@127.0.0.1:{port}?ssl_ca_certs={ca}",  # bad password
        f"rediss://127.0.0.1:{port}?ssl_ca_certs={ca}",  # no password
        f"redis://:{PASSWORD}@127.0.0.1:{port}",  # no TLS: the password is never sent
        f"rediss://:{PASSWORD}@127.0.0.1:{port}",  # TLS, but the server's CA not trusted
    ]
    for url in refused:
        backend = _backend(url)
        try:
            with pytest.raises(L2Unavailable):
                backend.get_many([key])
        finally:
            backend.close()


def test_cluster_seeds_keep_tls_user_and_password() -> None:
    """RedisCluster takes credentials and TLS as arguments, not from the seed URLs."""
    seen: dict[str, Any] = {}

    def fake_cluster(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return mock.Mock()

    for url, expected in (
        ("rediss://tc:pw%40x@10.0.0.1:7000,rediss://10.0.0.2:7000", ("tc", "pw@x", True)),
        ("redis://:pw@10.0.0.1:7000", (None, "pw", False)),
        ("10.0.0.1:7000", (None, None, False)),
    ):
        seen.clear()
        with mock.patch("redis.cluster.RedisCluster", side_effect=fake_cluster):
            RedisClusterBackend(url, timeout_s=1.0)._pipeline()
        assert (seen["username"], seen["password"], seen["ssl"]) == expected, url
        first = seen["startup_nodes"][0]
        assert (first.host, first.port) == ("10.0.0.1", 7000)


def test_the_l2_password_never_shows(tmp_path: Path) -> None:
    """``tokencake-ctl config`` (get_config) masks an l2_url with credentials, and the
    daemon's log never prints it, even when the store cannot be reached."""
    from tests.procs import start
    from tokencake.clients.client import TokenCakeClient

    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}"
    env = {"TOKENCAKE_L2_BACKEND": "redis", "TOKENCAKE_L2_URL": url}
    d = start(tmp_path, env=env, arena="1MiB")
    try:
        with TokenCakeClient(d.endpoint, timeout_s=5.0) as c:
            config = c.call(p.GetConfig()).config
            assert config["l2_url"] == "<set, with credentials>"
            assert config["l2_backend"] == "redis"
    finally:
        assert d.stop() == 0
    assert PASSWORD not in d.log()
