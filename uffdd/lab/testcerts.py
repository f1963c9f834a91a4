"""Throwaway certificates for tests and ``uffdd demo --tls``, made with the openssl CLI.

Never for production: keys are unencrypted, valid for two days, and written to a
directory the caller deletes. The openssl command-line tool is on Debian by default
(package ``openssl``); using it keeps the daemon free of a crypto dependency beyond
the standard library's ``ssl``.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uffdd.errors import UffddError

_DAYS = "2"
_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class CertFiles:
    """One certificate, its key, and the CA that signed it."""

    ca: Path
    cert: Path
    key: Path

    def toml(self, peer_names: list[str] | None = None) -> str:
        """The ``[peer]`` lines for a daemon that uses this certificate."""
        lines = [f'ca = "{self.ca}"', f'cert = "{self.cert}"', f'key = "{self.key}"']
        if peer_names is not None:
            lines.append("peer_names = [" + ", ".join(f'"{n}"' for n in peer_names) + "]")
        return "\n".join(lines) + "\n"


def openssl_available() -> bool:
    """True if the ``openssl`` command can be run."""
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise UffddError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def make_ca(directory: Path, name: str) -> Path:
    """Create a self-signed CA ``name`` in ``directory``; returns its certificate path."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *_CURVE, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", _DAYS, "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return directory / f"{name}.pem"


def make_cert(ca: Path, name: str, *, alt_names: list[str] | None = None) -> CertFiles:
    """Issue a certificate for ``name`` (server and client use) signed by CA ``ca``.

    ``alt_names`` go into subjectAltName (``DNS:x`` / ``IP:x`` given as plain names;
    addresses are recognised); ``name`` is always the first DNS name.
    """
    directory = ca.parent
    ca_key = ca.with_suffix(".key")
    sans = [f"DNS:{name}"]
    for alt in alt_names or []:
        sans.append(f"IP:{alt}" if _is_address(alt) else f"DNS:{alt}")
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={','.join(sans)}\n"
                   "basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", *_CURVE, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca.name, "-CAkey", ca_key.name,
             "-CAcreateserial", "-out", f"{name}.pem", "-days", _DAYS, "-extfile", ext.name,
             cwd=directory)
    return CertFiles(ca, directory / f"{name}.pem", directory / f"{name}.key")


def _is_address(text: str) -> bool:
    return text.replace(".", "").isdigit() or ":" in text


def make_pair(directory: Path) -> tuple[CertFiles, CertFiles]:
    """A CA and two certificates, ``uffdd-source`` and ``uffdd-destination`` (both
    also valid for 127.0.0.1), as a demo or test needs for two daemons on loopback."""
    ca = make_ca(directory, "uffdd-test-ca")
    return (make_cert(ca, "uffdd-source", alt_names=["127.0.0.1"]),
            make_cert(ca, "uffdd-destination", alt_names=["127.0.0.1"]))


def daemon_configs(directory: Path) -> dict[str, str]:
    """Config files (TOML text) for a ``source`` and a ``destination`` daemon on loopback
    that speak mutual TLS with throwaway certificates and pin each other's name."""
    source, destination = make_pair(directory)
    return {
        "source": "[peer]\n" + source.toml(["uffdd-destination"]),
        "destination": "[peer]\n" + destination.toml(["uffdd-source"]),
    }


def lanes_used_tls(daemon_log: str) -> bool:
    """Whether a source daemon's log shows lanes attached over mutual TLS."""
    return "lane (mutual TLS)" in daemon_log
