"""DICOM TLS on the SCP: a caller with a certificate from our CA stores; others are refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dmg_node import config
from dmg_node.errors import ConfigError
from tests.support import DCMTK, LOCALHOST, dcmtk_env, running_node, write_series

pytestmark = pytest.mark.network


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=dmg-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=dmg-test-{name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    # a client certificate from another CA: must be refused
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt",
             "-days", "2", "-subj", "/CN=rogue", cwd=d)


def _store(port: int, folder: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DCMTK["storescu"], "-aet", "SCANNER", "-aec", "DMG_NODE", *tls, "+sd", "+r", LOCALHOST,
                           str(port), str(folder)], capture_output=True, text=True, timeout=60, env=dcmtk_env())


def test_tls_requires_a_client_certificate_from_our_ca(tmp_path: Path) -> None:
    """With [tls] on, storescu with a CA-signed client certificate stores; plain TCP, no cert or a rogue cert fail."""
    pki = tmp_path / "pki"
    make_pki(pki)
    write_series(tmp_path / "in", 2)
    tls = {"enabled": True, "cert": str(pki / "server.crt"), "key": str(pki / "server.key"), "ca": str(pki / "ca.crt")}
    with running_node(tmp_path / "node", tls=tls) as node:
        good = _store(node.port, tmp_path / "in", "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                      "+cf", str(pki / "ca.crt"))
        assert good.returncode == 0, good.stdout + good.stderr
        assert _store(node.port, tmp_path / "in").returncode != 0
        assert _store(node.port, tmp_path / "in", "+tla", "+cf", str(pki / "ca.crt")).returncode != 0
        assert _store(node.port, tmp_path / "in", "+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"),
                      "+cf", str(pki / "ca.crt")).returncode != 0
        node.wait_event("association_released", stored=2)
        assert sum(e["event"] == "instance_stored" for e in node.events()) == 2


def test_tls_config_needs_files(tmp_path: Path) -> None:
    """tls.enabled without cert/key/ca files is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match="'tls.cert' must name a PEM file"):
        config.from_dict({"tls": {"enabled": True}})
    with pytest.raises(ConfigError, match="'tls.ca' names"):
        (tmp_path / "c.pem").write_text("x")
        config.from_dict({"tls": {"enabled": True, "cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "c.pem"),
                                  "ca": str(tmp_path / "missing.pem")}})
