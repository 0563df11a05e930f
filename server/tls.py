"""TLS for the gRPC port: the PEM files an operator names, read and checked once at start-up.

The files are checked with the standard library's OpenSSL before gRPC sees them: gRPC reports
a bad certificate or a key that does not match only as a port it cannot bind, which says
nothing about which file is wrong.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

_LABELS = {"cert": "certificate", "key": "private key", "client_ca": "client CA"}


class TlsFileError(ValueError):
    """A TLS file the server cannot use: which one (a field of TlsFiles) and why, in one line."""

    def __init__(self, field: str, path: Path, reason: str) -> None:
        super().__init__(f"TLS {_LABELS[field]} {path}: {reason}")
        self.field = field
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes of a TlsFiles, as gRPC takes them."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; with a client CA, a client without a certificate
        that CA signed is refused during the handshake."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The server's certificate chain and key, and optionally the CA its clients' certificates
    must be signed by (mutual TLS). Paths only: read when the server starts."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def read(self) -> TlsMaterial:
        """The files' bytes, once each is known to be usable; TlsFileError names the first that is not."""
        cert = _read("cert", self.cert)
        key = _read("key", self.key)
        _check_certificates("cert", self.cert, cert)
        _check_pair(self.cert, self.key)
        client_ca = None
        if self.client_ca is not None:
            client_ca = _read("client_ca", self.client_ca)
            _check_certificates("client_ca", self.client_ca, client_ca)
        return TlsMaterial(cert, key, client_ca)


def _read(field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsFileError(field, path, f"cannot read it ({error.strerror or error})") from None


def _check_certificates(field: str, path: Path, pem: bytes) -> None:
    """Raises TlsFileError unless ``pem`` holds at least one PEM certificate OpenSSL can parse."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise TlsFileError(field, path, "not a PEM certificate") from None


def _no_password() -> bytes:
    """An encrypted key fails to load instead of prompting on the terminal."""
    return b""


def _check_pair(cert: Path, key: Path) -> None:
    """Raises TlsFileError unless ``key`` is an unencrypted PEM key for the certificate ``cert``."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError("key", key, f"does not match the certificate {cert}") from None
        raise TlsFileError("key", key, "not a PEM private key (or an encrypted one)") from None
    except OSError as error:
        raise TlsFileError("key", key, f"cannot read it ({error.strerror or error})") from None
