"""TLS for the shim: its own HTTPS port, and the channel it dials a gRPC target over.

The PEM files are checked with the standard library's OpenSSL when the shim starts, so that a
missing file, a file that is not PEM or a key that does not match its certificate is reported
by name, rather than as a failed handshake on the first request or a server that will not start
for no stated reason. (The gRPC server has its own small copy of these checks: the shim and the
server do not import each other.)
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

_LABELS = {
    "cert": "certificate",
    "key": "private key",
    "client_ca": "client CA",
    "ca": "CA",
    "client_cert": "client certificate",
    "client_key": "client private key",
}


class TlsFileError(ValueError):
    """A TLS file the shim cannot use: which one (a field of HttpTls or ChannelTls) and why."""

    def __init__(self, field: str, path: Path, reason: str) -> None:
        super().__init__(f"TLS {_LABELS[field]} {path}: {reason}")
        self.field = field
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HttpTls:
    """The HTTP port's certificate chain and key, and optionally the CA whose certificates
    clients must present (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Raises TlsFileError naming the first file that cannot serve."""
        _check_certificates("cert", self.cert)
        _check_pair(self.cert, "key", self.key)
        if self.client_ca is not None:
            _check_certificates("client_ca", self.client_ca)

    def uvicorn_settings(self) -> dict[str, Any]:
        """uvicorn.Config's keyword arguments for these files."""
        settings: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            settings["ssl_ca_certs"] = str(self.client_ca)
            settings["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return settings


@dataclass(frozen=True, slots=True)
class ChannelTls:
    """How the shim dials its gRPC target over TLS: the CA to trust (None: the system's roots),
    a client certificate for a target that requires one, and the name to expect in the
    target's certificate when it differs from the target's host."""

    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("a client certificate and its key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel's credentials, the files read and checked now; TlsFileError names a bad one."""
        roots = None
        if self.ca is not None:
            roots = _read("ca", self.ca)
            _check_certificates("ca", self.ca, roots)
        chain = key = None
        if self.client_cert is not None and self.client_key is not None:
            chain = _read("client_cert", self.client_cert)
            key = _read("client_key", self.client_key)
            _check_certificates("client_cert", self.client_cert, chain)
            _check_pair(self.client_cert, "client_key", self.client_key)
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)

    def options(self) -> tuple[tuple[str, str], ...]:
        """Channel arguments: the expected server name, when one is set."""
        if self.server_name:
            return (("grpc.ssl_target_name_override", self.server_name),)
        return ()


def _read(field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsFileError(field, path, f"cannot read it ({error.strerror or error})") from None


def _check_certificates(field: str, path: Path, pem: bytes | None = None) -> None:
    """Raises TlsFileError unless the file holds at least one PEM certificate OpenSSL can parse."""
    if pem is None:
        pem = _read(field, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise TlsFileError(field, path, "not a PEM certificate") from None


def _no_password() -> bytes:
    """An encrypted key fails to load instead of prompting on the terminal."""
    return b""


def _check_pair(cert: Path, key_field: str, key: Path) -> None:
    """Raises TlsFileError unless ``key`` is an unencrypted PEM key for the certificate ``cert``."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(key_field, key, f"does not match the certificate {cert}") from None
        raise TlsFileError(key_field, key, "not a PEM private key (or an encrypted one)") from None
    except OSError as error:
        raise TlsFileError(key_field, key, f"cannot read it ({error.strerror or error})") from None
