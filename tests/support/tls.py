"""TLS for test Redis servers: a throwaway CA and a certificate for 127.0.0.1, made with the
openssl command (Debian's, beside redis-server), and the redis-server options that use them.

A client trusts the CA when `SSL_CERT_FILE` names it: dq's rediss:// connections use
`ssl.create_default_context()`, which reads the default verify paths, and so that variable.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def server_args(self, tls_port: int) -> list[str]:
        """redis-server options: TLS on `tls_port` (beside its plain port, which the test's
        own checks use), replication and the sentinels' links over TLS, no client
        certificates asked of clients (dq presents none)."""
        return ["--tls-port", str(tls_port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                "--tls-replication", "yes", "--tls-auth-clients", "no"]

    def conf_lines(self, tls_port: int) -> str:
        """The same options as lines of a config file (a sentinel's)."""
        args = self.server_args(tls_port)
        return "".join(f"{k[2:]} {v}\n" for k, v in zip(args[::2], args[1::2], strict=True))


def make_certs(home: Path) -> TlsFiles:
    """A CA and, signed by it, a certificate for IP 127.0.0.1 (EC P-256, valid 2 days)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command must be on PATH (Debian's openssl package)"
    home.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=home, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=dq test CA")
    run("req", *ec, "-keyout", "redis.key", "-out", "redis.csr", "-subj", "/CN=127.0.0.1")
    (home / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "redis.crt", "-days", "2", "-extfile", "san.ext")
    return TlsFiles(home / "ca.crt", home / "redis.crt", home / "redis.key")
