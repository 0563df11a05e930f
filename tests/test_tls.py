"""TLS and mutual TLS on every port, with certificates made for this run (trustme): the gRPC port
of a real server, the HTTP shim and the metrics exporter of real ``venna serve`` processes,
``venna http`` in front of a gRPC target that requires client certificates, and the CLI refusing
files it cannot use with one line and exit status 2."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
import trustme

from tests.conftest import async_stub, make_request, output_text, start_config
from tests.process_harness import ROOT, create_key, log_tail, read_startup_line
from tests.test_venice_backend import free_port
from venna.cli import commands
from venna.gateway_http.client import open_channel
from venna.gateway_http.tls import ChannelTls
from venna.responses.v1 import response_pb2
from venna.server.app import VennaServer
from venna.server.tls import TlsFileError, TlsFiles

# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pair:
    """A certificate chain and its key, as PEM files."""

    cert: Path
    key: Path

    def grpc_pair(self) -> tuple[bytes, bytes]:
        """(key, chain) bytes, as gRPC's credentials take them."""
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    """Two unrelated CAs: ``ca`` signs the server and a trusted client, ``other`` a stranger."""

    ca: Path
    other_ca: Path
    server: Pair
    client: Pair
    stranger: Pair
    # A server certificate naming only venna.internal: dialed by address, it needs a name override.
    named: Pair


def _write(directory: Path, name: str, cert: trustme.LeafCert) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    pair.key.write_bytes(cert.private_key_pem.bytes())
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(directory / "ca.pem")
    other.cert_pem.write_to_path(directory / "other-ca.pem")
    return Pki(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server=_write(directory, "server", ca.issue_cert("127.0.0.1", "localhost")),
        client=_write(directory, "client", ca.issue_cert("client@venna.test")),
        stranger=_write(directory, "stranger", other.issue_cert("stranger@venna.test")),
        named=_write(directory, "named", ca.issue_cert("venna.internal")),
    )


def client_context(ca: Path, cert: Pair | None = None) -> ssl.SSLContext:
    """An HTTPS client context trusting ``ca``, presenting ``cert`` when given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


# ------------------------------------------------------------------ the gRPC port, in process


@contextlib.asynccontextmanager
async def tls_server(db: Path, files: TlsFiles) -> AsyncIterator[tuple[VennaServer, str]]:
    """A started server with TLS on its gRPC port, and a key of workspace alpha."""
    server = VennaServer(start_config(db, tls=files))
    await server.start()
    try:
        key, _ = await server.store.create_key("alpha")
        yield server, key
    finally:
        await server.stop(grace=0.5)


def secure_channel(
    address: str, ca: Path, client: Pair | None = None, server_name: str | None = None
) -> grpc.aio.Channel:
    key, chain = client.grpc_pair() if client else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key, chain)
    options = (("grpc.ssl_target_name_override", server_name),) if server_name else ()
    return grpc.aio.secure_channel(address, credentials, options=options)


async def create(channel: grpc.aio.Channel, key: str) -> response_pb2.Response:
    """A real CreateResponse with the echo model."""
    return await async_stub(channel).CreateResponse(
        make_request(input="over tls"), metadata=(("authorization", f"Bearer {key}"),), timeout=10
    )


async def refused(channel: grpc.aio.Channel, key: str) -> grpc.StatusCode:
    """The status of a CreateResponse that must fail on the connection, the channel closed."""
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await create(channel, key)
    return failure.value.code()


async def test_the_grpc_port_serves_tls_to_clients_that_trust_its_ca(tmp_path: Path, pki: Pki) -> None:
    async with tls_server(tmp_path / "venna.db", TlsFiles(pki.server.cert, pki.server.key)) as (server, key):
        async with secure_channel(server.address, pki.ca) as channel:
            response = await create(channel, key)
        assert response.status == response_pb2.RESPONSE_STATUS_COMPLETED
        assert output_text(response) == "over tls"
        assert await refused(grpc.aio.insecure_channel(server.address), key) == grpc.StatusCode.UNAVAILABLE
        assert await refused(secure_channel(server.address, pki.other_ca), key) == grpc.StatusCode.UNAVAILABLE


async def test_with_a_client_ca_the_grpc_port_requires_a_certificate_it_signed(
    tmp_path: Path, pki: Pki
) -> None:
    files = TlsFiles(pki.server.cert, pki.server.key, client_ca=pki.ca)
    async with tls_server(tmp_path / "venna.db", files) as (server, key):
        assert await refused(secure_channel(server.address, pki.ca), key) == grpc.StatusCode.UNAVAILABLE
        stranger = secure_channel(server.address, pki.ca, client=pki.stranger)
        assert await refused(stranger, key) == grpc.StatusCode.UNAVAILABLE
        async with secure_channel(server.address, pki.ca, client=pki.client) as channel:
            response = await create(channel, key)
        assert output_text(response) == "over tls"


async def test_the_shims_channel_dials_tls_with_a_client_certificate_and_a_server_name(
    tmp_path: Path, pki: Pki
) -> None:
    """open_channel as ``venna http`` uses it: the CA, the client certificate, and the name the
    target's certificate carries when it is not the target's address."""
    files = TlsFiles(pki.named.cert, pki.named.key, client_ca=pki.ca)
    async with tls_server(tmp_path / "venna.db", files) as (server, key):
        tls = ChannelTls(pki.ca, pki.client.cert, pki.client.key, server_name="venna.internal")
        async with open_channel(server.address, tls) as channel:
            assert output_text(await create(channel, key)) == "over tls"
        unnamed = ChannelTls(pki.ca, pki.client.cert, pki.client.key)
        assert await refused(open_channel(server.address, unnamed), key) == grpc.StatusCode.UNAVAILABLE


async def test_a_server_with_a_bad_tls_file_does_not_start(tmp_path: Path, pki: Pki) -> None:
    server = VennaServer(start_config(tmp_path / "venna.db", tls=TlsFiles(pki.server.cert, pki.client.key)))
    with pytest.raises(TlsFileError, match="does not match the certificate") as failure:
        await server.start()
    assert failure.value.field == "key"
    assert server.port == 0
    await server.stop(grace=0)


# ------------------------------------------------------------------ real processes

SERVE_LINE = re.compile(r"gRPC on (\S+), HTTP on (https://\S+)/v1,")


@contextlib.contextmanager
def venna(log: Path, *args: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A ``venna`` process started with ``args``; yields its start-up line, and kills it at the end."""
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "venna.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, "VENNA_LOG_LEVEL": "WARNING", **(env or {})},
        )
    try:
        line = read_startup_line(process, 30).decode()
        assert line, f"no start-up line (exit status {process.poll()}); log:\n{log_tail(log)}"
        yield line
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def serve_args(db: Path, *extra: str) -> tuple[str, ...]:
    return ("serve", "--db", str(db), "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *extra)


def post_response(http: httpx.Client, base_url: str, key: str) -> httpx.Response:
    return http.post(
        base_url + "/responses",
        json={"model": "echo", "input": "over https"},
        headers={"authorization": f"Bearer {key}"},
    )


async def test_serve_with_tls_from_the_environment_serves_https_grpc_and_metrics(
    tmp_path: Path, pki: Pki
) -> None:
    db = tmp_path / "venna.db"
    key = create_key(db, "alpha")
    metrics = f"127.0.0.1:{free_port()}"
    files = {"VENNA_TLS_CERT": str(pki.server.cert), "VENNA_TLS_KEY": str(pki.server.key)}
    with venna(tmp_path / "serve.log", *serve_args(db, "--metrics-listen", metrics), env=files) as line:
        match = SERVE_LINE.search(line)
        assert match is not None, line
        assert line.rstrip().endswith(", TLS"), line
        grpc_address, root = match.groups()
        async with httpx.AsyncClient(verify=client_context(pki.ca), timeout=10) as http:
            assert (await http.get(root + "/livez")).status_code == 200
            answer = await http.post(
                root + "/v1/responses",
                json={"model": "echo", "input": "over https"},
                headers={"authorization": f"Bearer {key}"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["output"][0]["content"][0]["text"] == "over https"
            # A client that connects and never finishes its handshake holds nobody else up.
            host, port = metrics.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as stalled:
                stalled.sendall(b"\x16\x03\x01")  # the first bytes of a TLS record, no more
                began = time.monotonic()
                exposition = await http.get(f"https://{metrics}/metrics")
                assert time.monotonic() - began < 5
            assert exposition.status_code == 200
            assert "venna_rpc_calls_total" in exposition.text
            assert (await http.get(f"https://{metrics}/readyz")).status_code == 200
        async with httpx.AsyncClient(timeout=10) as system_roots:
            with pytest.raises(httpx.ConnectError):  # the system's CAs do not know this one
                await system_roots.get(root + "/livez")
            with pytest.raises(httpx.TransportError):  # plaintext to the TLS port
                await system_roots.get(root.replace("https://", "http://") + "/livez")
        async with secure_channel(grpc_address, pki.ca) as channel:
            assert output_text(await create(channel, key)) == "over tls"


def test_serve_with_a_client_ca_requires_client_certificates_on_https_and_metrics(
    tmp_path: Path, pki: Pki
) -> None:
    db = tmp_path / "venna.db"
    key = create_key(db, "alpha")
    metrics = f"127.0.0.1:{free_port()}"
    tls = (
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--tls-client-ca",
        str(pki.ca),
    )
    with venna(tmp_path / "serve.log", *serve_args(db, "--metrics-listen", metrics, *tls)) as line:
        match = SERVE_LINE.search(line)
        assert match is not None and "mutual TLS" in line, line
        root = match.group(2)
        for stranger in (None, pki.stranger):
            with (
                httpx.Client(verify=client_context(pki.ca, stranger), timeout=10) as http,
                pytest.raises(httpx.TransportError),
            ):
                post_response(http, root + "/v1", key)
            with (
                httpx.Client(verify=client_context(pki.ca, stranger), timeout=10) as http,
                pytest.raises(httpx.TransportError),
            ):
                http.get(f"https://{metrics}/metrics")
        with httpx.Client(verify=client_context(pki.ca, pki.client), timeout=10) as http:
            assert http.get(root + "/livez").status_code == 200
            answer = post_response(http, root + "/v1", key)
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "completed"
            assert http.get(f"https://{metrics}/metrics").status_code == 200


def test_venna_http_serves_https_in_front_of_an_mtls_grpc_target(tmp_path: Path, pki: Pki) -> None:
    db = tmp_path / "venna.db"
    key = create_key(db, "alpha")
    server_tls = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    grpc_only = ("serve", "--db", str(db), "--grpc-listen", "127.0.0.1:0", "--no-http")
    with venna(tmp_path / "serve.log", *grpc_only, *server_tls, "--tls-client-ca", str(pki.ca)) as line:
        target = line.split("gRPC on ")[1].split(",")[0]
        shim = ("http", "--grpc-target", target, "--http-listen", "127.0.0.1:0", *server_tls)
        client_cert = ("--grpc-client-cert", str(pki.client.cert), "--grpc-client-key", str(pki.client.key))
        with venna(tmp_path / "http.log", *shim, "--grpc-ca", str(pki.ca), *client_cert) as shim_line:
            assert "calling gRPC at" in shim_line and shim_line.rstrip().endswith("over TLS"), shim_line
            root = shim_line.split("HTTP on ")[1].split("/v1")[0]
            assert root.startswith("https://"), shim_line
            with httpx.Client(verify=client_context(pki.ca), timeout=10) as http:
                assert http.get(root + "/readyz").status_code == 200
                answer = post_response(http, root + "/v1", key)
                assert answer.status_code == 200, answer.text
                assert answer.json()["output"][0]["content"][0]["text"] == "over https"
        # Without a client certificate the target refuses the shim: it is not ready.
        with (
            venna(tmp_path / "http.log", *shim, "--grpc-ca", str(pki.ca)) as shim_line,
            httpx.Client(verify=client_context(pki.ca), timeout=10) as http,
        ):
            root = shim_line.split("HTTP on ")[1].split("/v1")[0]
            assert http.get(root + "/readyz").status_code == 503


# ------------------------------------------------------------------ settings


def test_the_grpc_tls_settings_of_venna_http_come_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [name for name in os.environ if name.startswith("VENNA_")]:
        monkeypatch.delenv(name)

    def channel_tls(*argv: str) -> ChannelTls | None:
        return commands._channel_tls(commands._build_parser().parse_args(["http", *argv]))

    assert channel_tls() is None
    assert channel_tls("--grpc-tls") == ChannelTls()
    assert channel_tls("--grpc-server-name", "venna.internal") == ChannelTls(server_name="venna.internal")
    monkeypatch.setenv("VENNA_GRPC_TLS", "yes")
    assert channel_tls() == ChannelTls()
    monkeypatch.setenv("VENNA_GRPC_TLS", "0")
    assert channel_tls() is None
    monkeypatch.setenv("VENNA_GRPC_CA", "/etc/venna/ca.pem")  # a CA implies TLS
    monkeypatch.setenv("VENNA_GRPC_CLIENT_CERT", "/etc/venna/shim.pem")
    monkeypatch.setenv("VENNA_GRPC_CLIENT_KEY", "/etc/venna/shim.key")
    assert channel_tls() == ChannelTls(
        Path("/etc/venna/ca.pem"), Path("/etc/venna/shim.pem"), Path("/etc/venna/shim.key")
    )
    monkeypatch.setenv("VENNA_GRPC_TLS", "maybe")
    with pytest.raises(commands.SettingError, match="VENNA_GRPC_TLS"):
        channel_tls()


def test_the_tls_files_of_venna_serve_come_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [name for name in os.environ if name.startswith("VENNA_")]:
        monkeypatch.delenv(name)

    def tls_files(*argv: str) -> TlsFiles | None:
        return commands._tls_files(commands._build_parser().parse_args(["serve", *argv]))

    assert tls_files() is None
    assert tls_files("--tls-cert", "a.pem", "--tls-key", "a.key") == TlsFiles(Path("a.pem"), Path("a.key"))
    monkeypatch.setenv("VENNA_TLS_CERT", "b.pem")
    monkeypatch.setenv("VENNA_TLS_KEY", "b.key")
    monkeypatch.setenv("VENNA_TLS_CLIENT_CA", "ca.pem")
    assert tls_files() == TlsFiles(Path("b.pem"), Path("b.key"), Path("ca.pem"))
    assert tls_files("--tls-key", "c.key") == TlsFiles(Path("b.pem"), Path("c.key"), Path("ca.pem"))


# ------------------------------------------------------------------ refusals


def _refusal_cases(pki: Pki, missing: Path) -> dict[str, tuple[tuple[str, ...], str]]:
    """Arguments, and the one line the command must answer them with."""
    cert, key = str(pki.server.cert), str(pki.server.key)
    return {
        "missing certificate": (
            ("--tls-cert", str(missing), "--tls-key", key),
            f"--tls-cert {missing}: cannot read it (No such file or directory)",
        ),
        "key of another certificate": (
            ("--tls-cert", cert, "--tls-key", str(pki.client.key)),
            f"--tls-key {pki.client.key}: does not match the certificate {cert}",
        ),
        "certificate that is not PEM": (
            ("--tls-cert", key, "--tls-key", key),
            f"--tls-cert {key}: not a PEM certificate",
        ),
        "client CA that is not PEM": (
            ("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key),
            f"--tls-client-ca {key}: not a PEM certificate",
        ),
        "certificate without key": (
            ("--tls-cert", cert),
            "--tls-cert and --tls-key go together: give both, or neither",
        ),
        "client CA alone": (
            ("--tls-client-ca", str(pki.ca)),
            "--tls-client-ca needs --tls-cert and --tls-key",
        ),
    }


REFUSALS = (
    "missing certificate",
    "key of another certificate",
    "certificate that is not PEM",
    "client CA that is not PEM",
    "certificate without key",
    "client CA alone",
)


def run_venna(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "venna.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_refused(finished: subprocess.CompletedProcess[str], message: str) -> None:
    assert finished.returncode == 2, finished.stderr
    assert "Traceback" not in finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("venna: " + message), finished.stderr
    assert finished.stdout == ""


@pytest.mark.parametrize("case", REFUSALS)
def test_serve_refuses_tls_files_it_cannot_use_in_one_line(tmp_path: Path, pki: Pki, case: str) -> None:
    args, message = _refusal_cases(pki, tmp_path / "missing.pem")[case]
    db = tmp_path / "venna.db"
    assert_refused(
        run_venna("serve", "--db", str(db), "--grpc-listen", "127.0.0.1:0", "--no-http", *args), message
    )
    assert not db.exists()  # refused before anything was opened


def test_venna_http_refuses_grpc_tls_files_it_cannot_use_in_one_line(tmp_path: Path, pki: Pki) -> None:
    listen = ("--http-listen", "127.0.0.1:0")
    missing = tmp_path / "missing.pem"
    assert_refused(
        run_venna("http", *listen, "--grpc-ca", str(missing)),
        f"--grpc-ca {missing}: cannot read it (No such file or directory)",
    )
    assert_refused(
        run_venna(
            "http",
            *listen,
            "--grpc-client-cert",
            str(pki.client.cert),
            "--grpc-client-key",
            str(pki.stranger.key),
        ),
        f"--grpc-client-key {pki.stranger.key}: does not match the certificate {pki.client.cert}",
    )
