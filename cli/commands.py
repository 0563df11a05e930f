"""The ``venna`` command: ``serve``, ``http``, ``keys`` and ``usage``.

This is where the gRPC service and the HTTP shim are composed; neither imports the other.

Settings come from flags, then ``VENNA_*`` environment variables, then defaults that bind to
127.0.0.1 and use ``./venna.db``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import venna
from venna.backends.store import (
    ResponseStore,
    StoreUnavailable,
    UsageTotal,
    WorkspaceUnavailable,
    copy_store,
    describe,
    open_store,
    sum_usage,
)
from venna.cli.logs import configure_logging
from venna.cli.tracing import MODES as TRACE_MODES
from venna.cli.tracing import TracingUnavailable
from venna.cli.tracing import start as start_tracing
from venna.gateway_http.app import create_app, create_metrics_app
from venna.gateway_http.client import ChannelClient, InProcessClient, open_channel
from venna.gateway_http.server import DEFAULT_LIMITS, ConnectionLimits, HttpServer, split_address
from venna.gateway_http.tls import ChannelTls, HttpTls
from venna.gateway_http.tls import TlsFileError as HttpTlsFileError
from venna.server.app import ServerConfig, VennaServer, stop_signals
from venna.server.tls import TlsFileError, TlsFiles
from venna.server.validation import Limits

log = logging.getLogger(__name__)

DEFAULTS = ServerConfig()
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    """A logging level by name, any case; checked here because an environment default skips
    argparse's ``choices``."""
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(_LOG_LEVELS)}, got '{text}'")
    return text.upper()


def add_log_level(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--log-level",
        type=_log_level,
        default=_env("VENNA_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (env VENNA_LOG_LEVEL; default INFO)",
    )
    command.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("VENNA_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per line (env VENNA_LOG_FORMAT; default text)",
    )


def _traces_mode(text: str) -> str:
    """A --traces mode; checked here because an environment default skips argparse's ``choices``."""
    if text not in TRACE_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TRACE_MODES)}, got '{text}'")
    return text


def add_traces(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--traces",
        type=_traces_mode,
        default=_env("VENNA_TRACES", "off"),
        metavar="{off,otlp,console}",
        help="OpenTelemetry traces: otlp exports over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT "
        "(or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), console writes spans to stderr; needs the "
        "otel extra (env VENNA_TRACES; default off)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="venna", description="Venna: a stateful Responses API gateway.")
    parser.add_argument("--version", action="version", version=f"venna {venna.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_db(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--db",
            default=_env("VENNA_DB", str(DEFAULTS.db_path)),
            help="the store: a SQLite file, or a postgresql:// URL (env VENNA_DB; default ./venna.db)",
        )

    serve_command = commands.add_parser("serve", help="run the gRPC server")
    serve_command.add_argument(
        "--grpc-listen",
        default=_env("VENNA_GRPC_LISTEN", DEFAULTS.grpc_listen),
        metavar="HOST:PORT",
        help=f"gRPC address (env VENNA_GRPC_LISTEN; default {DEFAULTS.grpc_listen})",
    )
    add_db(serve_command)
    serve_command.add_argument(
        "--http-listen",
        default=_env("VENNA_HTTP_LISTEN", DEFAULT_HTTP_LISTEN),
        metavar="HOST:PORT",
        help=f"HTTP shim address (env VENNA_HTTP_LISTEN; default {DEFAULT_HTTP_LISTEN})",
    )
    serve_command.add_argument(
        "--cors-origins",
        default=_env("VENNA_CORS_ORIGINS", ""),
        metavar="ORIGINS",
        help="comma-separated browser origins allowed to call the HTTP API, or * for any "
        "(env VENNA_CORS_ORIGINS; default none: no CORS)",
    )
    serve_command.add_argument("--no-http", action="store_true", help="serve gRPC only")
    serve_command.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("VENNA_CONFIG") or None,
        metavar="PATH",
        help="routing table: upstreams and model aliases (env VENNA_CONFIG; default ./venna.toml if present)",
    )
    serve_command.add_argument(
        "--shutdown-grace",
        type=_number(float, "VENNA_SHUTDOWN_GRACE"),
        default=_env("VENNA_SHUTDOWN_GRACE", str(DEFAULTS.shutdown_grace)),
        metavar="SECONDS",
        help="time in-flight work gets to finish on SIGTERM/SIGINT (env VENNA_SHUTDOWN_GRACE)",
    )
    serve_command.add_argument(
        "--background-concurrency",
        type=_number(int, "VENNA_BACKGROUND_CONCURRENCY"),
        default=_env("VENNA_BACKGROUND_CONCURRENCY", str(DEFAULTS.background_concurrency)),
        metavar="N",
        help="background responses run at once (env VENNA_BACKGROUND_CONCURRENCY)",
    )
    serve_command.add_argument(
        "--drain-seconds",
        type=_number(float, "VENNA_DRAIN_SECONDS"),
        default=_env("VENNA_DRAIN_SECONDS", "0"),
        metavar="SECONDS",
        help="on SIGTERM, report not ready (health NOT_SERVING, /readyz 503) for this long while "
        "still serving, before the listeners close (env VENNA_DRAIN_SECONDS; default 0)",
    )
    serve_command.add_argument(
        "--metrics-listen",
        default=_env("VENNA_METRICS_LISTEN", ""),
        metavar="HOST:PORT",
        help="also serve GET /metrics on this address, for deployments without the HTTP shim "
        "(env VENNA_METRICS_LISTEN; the shim serves /metrics on its own port)",
    )
    serve_command.add_argument(
        "--lease-seconds",
        type=_number(float, "VENNA_LEASE_SECONDS"),
        default=_env("VENNA_LEASE_SECONDS", str(DEFAULTS.lease_seconds)),
        metavar="SECONDS",
        help="how long an unfinished response stays this process's without a renewal: the delay "
        "before another replica recovers a lost replica's work (env VENNA_LEASE_SECONDS)",
    )
    serve_command.add_argument(
        "--key-cache-seconds",
        type=_number(float, "VENNA_KEY_CACHE_SECONDS"),
        default=_env("VENNA_KEY_CACHE_SECONDS", str(DEFAULTS.key_cache_seconds)),
        metavar="SECONDS",
        help="how long an accepted key is trusted without a lookup; bounds how long a revoked key "
        "keeps working (env VENNA_KEY_CACHE_SECONDS)",
    )
    add_tls(serve_command, "every port: gRPC, the HTTP shim and --metrics-listen")
    add_limits(serve_command, (*_LIMIT_FLAGS, *_HTTP_LIMIT_FLAGS))
    add_log_level(serve_command)
    add_traces(serve_command)

    http_command = commands.add_parser("http", help="run only the HTTP shim, in front of a gRPC target")
    http_command.add_argument(
        "--grpc-target",
        default=_env("VENNA_GRPC_TARGET", DEFAULTS.grpc_listen),
        metavar="HOST:PORT",
        help=f"the Venna gRPC service to call (env VENNA_GRPC_TARGET; default {DEFAULTS.grpc_listen})",
    )
    http_command.add_argument(
        "--http-listen",
        default=_env("VENNA_HTTP_LISTEN", DEFAULT_HTTP_LISTEN),
        metavar="HOST:PORT",
        help=f"HTTP address (env VENNA_HTTP_LISTEN; default {DEFAULT_HTTP_LISTEN})",
    )
    http_command.add_argument(
        "--cors-origins",
        default=_env("VENNA_CORS_ORIGINS", ""),
        metavar="ORIGINS",
        help="comma-separated browser origins allowed to call the HTTP API, or * for any "
        "(env VENNA_CORS_ORIGINS; default none: no CORS)",
    )
    http_command.add_argument(
        "--max-request-bytes",
        type=_number(int, "VENNA_MAX_REQUEST_BYTES"),
        default=_env("VENNA_MAX_REQUEST_BYTES", str(DEFAULTS.max_request_bytes)),
        metavar="N",
        help="largest request body accepted, in bytes (env VENNA_MAX_REQUEST_BYTES; "
        f"default {DEFAULTS.max_request_bytes})",
    )
    add_tls(http_command, "the HTTP port")
    add_grpc_tls(http_command)
    add_limits(http_command, _HTTP_LIMIT_FLAGS)
    add_log_level(http_command)
    add_traces(http_command)

    keys = commands.add_parser("keys", help="manage workspace API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key; it is printed once and stored only as a hash")
    owner = create.add_mutually_exclusive_group(required=True)
    owner.add_argument("--workspace", help="workspace name (created if new)")
    owner.add_argument(
        "--admin", action="store_true", help="an admin key: for the admin API only, of no workspace"
    )
    add_db(create)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--workspace", metavar="NAME", help="only this workspace's keys")
    add_db(listing)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (see 'keys list')")
    revoke.add_argument("key_id")
    add_db(revoke)

    workspaces = commands.add_parser("workspaces", help="list and revoke workspaces").add_subparsers(
        dest="workspaces_command", required=True
    )
    add_db(workspaces.add_parser("list", help="list workspaces with their limits"))
    revoke_workspace = workspaces.add_parser(
        "revoke", help="revoke a workspace and every key of it (its data is kept)"
    )
    revoke_workspace.add_argument("name")
    add_db(revoke_workspace)

    limits = commands.add_parser("limits", help="limits per workspace, on every replica").add_subparsers(
        dest="limits_command", required=True
    )
    set_limits = limits.add_parser("set", help="set a workspace's limits (0 removes one; others unchanged)")
    set_limits.add_argument("--workspace", required=True, metavar="NAME")
    for flag, what in (
        ("--requests-per-minute", "responses created per minute"),
        ("--tokens-per-minute", "tokens of the responses of the last minute"),
        ("--monthly-tokens", "tokens per calendar month (UTC)"),
    ):
        set_limits.add_argument(flag, type=_count, metavar="N", help=what)
    add_db(set_limits)
    show_limits = limits.add_parser("show", help="show a workspace's limits")
    show_limits.add_argument("--workspace", required=True, metavar="NAME")
    add_db(show_limits)

    usage = commands.add_parser(
        "usage", help="token usage per workspace, from the usage records of finished responses"
    )
    usage.add_argument("--workspace", metavar="NAME", help="only this workspace (default: every workspace)")
    usage.add_argument(
        "--since",
        type=_time_bound,
        metavar="YYYY-MM-DD|UNIX",
        help="count responses created at or after this time (UTC; an ISO date-time also works)",
    )
    usage.add_argument(
        "--until",
        type=_time_bound,
        metavar="YYYY-MM-DD|UNIX",
        help="count responses created before this time (UTC; an ISO date-time also works)",
    )
    usage.add_argument("--by-model", action="store_true", help="one row per model")
    usage.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_db(usage)

    database = commands.add_parser("db", help="move the store between engines").add_subparsers(
        dest="db_command", required=True
    )
    copy = database.add_parser(
        "copy",
        help="copy every record of a SQLite file into an empty PostgreSQL database (all or nothing)",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="PATH", help="the SQLite file")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="a postgresql:// URL")
    return parser


def add_tls(command: argparse.ArgumentParser, where: str) -> None:
    """--tls-cert, --tls-key and --tls-client-ca, each also read from the environment."""
    for flag, what in (
        ("--tls-cert", f"PEM certificate chain: serve TLS on {where}; needs --tls-key"),
        ("--tls-key", "PEM private key of --tls-cert (unencrypted)"),
        (
            "--tls-client-ca",
            "PEM CA certificate(s): require clients to present a certificate it signed "
            "(mutual TLS); needs --tls-cert and --tls-key",
        ),
    ):
        env = "VENNA_" + flag.removeprefix("--").replace("-", "_").upper()
        command.add_argument(
            flag,
            type=Path,
            default=os.environ.get(env) or None,
            metavar="PATH",
            help=f"{what} (env {env})",
        )


def add_grpc_tls(command: argparse.ArgumentParser) -> None:
    """``venna http``'s flags for dialing a gRPC target over TLS."""
    command.add_argument(
        "--grpc-tls",
        action="store_true",
        default=None,
        help="dial the gRPC target over TLS, trusting the system's CAs (env VENNA_GRPC_TLS=1); "
        "implied by the other --grpc-* TLS flags",
    )
    command.add_argument(
        "--grpc-ca",
        type=Path,
        default=os.environ.get("VENNA_GRPC_CA") or None,
        metavar="PATH",
        help="dial over TLS, trusting this PEM CA instead of the system's (env VENNA_GRPC_CA)",
    )
    command.add_argument(
        "--grpc-client-cert",
        type=Path,
        default=os.environ.get("VENNA_GRPC_CLIENT_CERT") or None,
        metavar="PATH",
        help="PEM client certificate to present to a target that requires one (mutual TLS); "
        "needs --grpc-client-key (env VENNA_GRPC_CLIENT_CERT)",
    )
    command.add_argument(
        "--grpc-client-key",
        type=Path,
        default=os.environ.get("VENNA_GRPC_CLIENT_KEY") or None,
        metavar="PATH",
        help="PEM private key of --grpc-client-cert (env VENNA_GRPC_CLIENT_KEY)",
    )
    command.add_argument(
        "--grpc-server-name",
        default=os.environ.get("VENNA_GRPC_SERVER_NAME") or None,
        metavar="NAME",
        help="the name the target's certificate must carry, when it is not the target's host "
        "(env VENNA_GRPC_SERVER_NAME)",
    )


_REQUEST_LIMITS = frozenset(limit.name for limit in dataclasses.fields(Limits))
_HTTP_LIMITS = frozenset(limit.name for limit in dataclasses.fields(ConnectionLimits))


def _number(kind: type[int] | type[float], env: str) -> Callable[[str], int | float]:
    """An argparse type for a number that may come from ``env``: a bad value is a usage error
    naming the variable, not a traceback in every subcommand."""

    def parse(text: str) -> int | float:
        try:
            return kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}' (flag or {env})") from None

    return parse


@dataclasses.dataclass(frozen=True, slots=True)
class _LimitFlag:
    """A limit: a field of ServerConfig, of its request Limits or of the shim's
    ConnectionLimits, also read from the environment (--grpc-max-connections from
    VENNA_GRPC_MAX_CONNECTIONS)."""

    flag: str
    field: str
    help: str

    @property
    def env(self) -> str:
        return "VENNA_" + self.flag.removeprefix("--").replace("-", "_").upper()

    @property
    def default(self) -> int | float:
        if self.field in _HTTP_LIMITS:
            holder: object = DEFAULT_LIMITS
        elif self.field in _REQUEST_LIMITS:
            holder = DEFAULTS.limits
        else:
            holder = DEFAULTS
        value = getattr(holder, self.field)
        assert isinstance(value, int | float)
        return value


_LIMIT_FLAGS = (
    _LimitFlag(
        "--max-request-bytes", "max_request_bytes", "largest request message or body accepted, in bytes"
    ),
    _LimitFlag("--max-input-items", "max_input_items", "input items in one create request"),
    _LimitFlag("--max-model-chars", "max_model_chars", "characters in a model name"),
    _LimitFlag("--max-chain-depth", "max_chain_depth", "responses that may precede a new one in its chain"),
    _LimitFlag(
        "--max-background-per-workspace",
        "max_background_per_workspace",
        "background responses one workspace may have queued or running",
    ),
    _LimitFlag(
        "--max-concurrent-per-key", "max_concurrent_per_key", "calls and streams one key runs at once"
    ),
    _LimitFlag("--grpc-max-concurrent-rpcs", "max_concurrent_rpcs", "gRPC calls and streams run at once"),
    _LimitFlag("--grpc-max-connections", "max_connections", "gRPC connections open at once"),
    _LimitFlag(
        "--grpc-max-streams-per-connection", "max_streams_per_connection", "streams at once on one connection"
    ),
    _LimitFlag("--grpc-handshake-timeout", "handshake_timeout", "seconds a new connection gets to handshake"),
    _LimitFlag(
        "--grpc-max-connection-idle",
        "max_connection_idle",
        "seconds without a call before a connection closes",
    ),
    _LimitFlag(
        "--grpc-max-connection-age", "max_connection_age", "seconds before a connection is asked to go away"
    ),
    _LimitFlag(
        "--grpc-max-connection-age-grace", "max_connection_age_grace", "seconds its calls then get to finish"
    ),
    _LimitFlag("--grpc-keepalive-time", "keepalive_time", "seconds of quiet before a connection is pinged"),
    _LimitFlag(
        "--grpc-keepalive-timeout", "keepalive_timeout", "seconds a ping may go unanswered before closing"
    ),
)

# The shim's connection limits, for ``venna serve`` and ``venna http`` alike.
_HTTP_LIMIT_FLAGS = (
    _LimitFlag(
        "--http-header-timeout", "header_timeout", "seconds a client gets to send a request's headers"
    ),
    _LimitFlag("--http-body-timeout", "body_timeout", "seconds a client gets to send a request's body"),
    _LimitFlag(
        "--http-keep-alive-timeout",
        "keep_alive_timeout",
        "seconds an idle keep-alive connection is kept open",
    ),
    _LimitFlag("--http-max-connections", "max_connections", "HTTP connections open at once"),
    _LimitFlag("--http-max-header-bytes", "max_header_bytes", "largest request head accepted, in bytes"),
)


def add_limits(command: argparse.ArgumentParser, flags: Sequence[_LimitFlag]) -> None:
    for limit in flags:
        kind = type(limit.default)
        command.add_argument(
            limit.flag,
            type=_number(kind, limit.env),
            dest=("http_" if limit in _HTTP_LIMIT_FLAGS else "") + limit.field,
            # A string default goes through ``type`` like a flag's value: a bad environment
            # variable is reported as a usage error of this command only.
            default=_env(limit.env, str(limit.default)),
            metavar="SECONDS" if kind is float else "N",
            help=f"{limit.help} (env {limit.env}; default {limit.default})",
        )


def _limit_settings(options: argparse.Namespace) -> dict[str, object]:
    """ServerConfig's keyword arguments for the limit flags."""
    settings: dict[str, object] = {
        limit.field: getattr(options, limit.field)
        for limit in _LIMIT_FLAGS
        if limit.field not in _REQUEST_LIMITS
    }
    settings["limits"] = Limits(**{name: getattr(options, name) for name in _REQUEST_LIMITS})
    return settings


def _origins(value: str) -> tuple[str, ...]:
    """``--cors-origins``: comma-separated origins, blanks dropped."""
    return tuple(origin.strip() for origin in value.split(",") if origin.strip())


def _http_limits(options: argparse.Namespace) -> ConnectionLimits:
    """The shim's connection limits from the --http-* flags; ValueError names a bad one."""
    limits = ConnectionLimits(
        **{limit.field: getattr(options, "http_" + limit.field) for limit in _HTTP_LIMIT_FLAGS}
    )
    for limit in _HTTP_LIMIT_FLAGS:
        if getattr(limits, limit.field) <= 0:
            raise ValueError(f"{limit.flag} must be positive, got {getattr(limits, limit.field)}")
    return limits


# The flag that names each TLS file, by its field in TlsFiles, HttpTls or ChannelTls.
_TLS_FLAGS = {
    "cert": "--tls-cert",
    "key": "--tls-key",
    "client_ca": "--tls-client-ca",
    "ca": "--grpc-ca",
    "client_cert": "--grpc-client-cert",
    "client_key": "--grpc-client-key",
}


def _tls_files(options: argparse.Namespace) -> TlsFiles | None:
    """--tls-cert, --tls-key and --tls-client-ca; SettingError when they do not go together."""
    cert, key, client_ca = options.tls_cert, options.tls_key, options.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise SettingError("--tls-client-ca needs --tls-cert and --tls-key (the server's own pair)")
        return None
    if cert is None or key is None:
        raise SettingError("--tls-cert and --tls-key go together: give both, or neither")
    return TlsFiles(cert, key, client_ca)


def _http_tls(files: TlsFiles | None) -> HttpTls | None:
    return HttpTls(files.cert, files.key, files.client_ca) if files else None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _channel_tls(options: argparse.Namespace) -> ChannelTls | None:
    """How ``venna http`` dials its target: None for plaintext; SettingError for flags that do
    not go together or a VENNA_GRPC_TLS that is not a yes or a no."""
    enabled = options.grpc_tls
    if enabled is None:
        value = os.environ.get("VENNA_GRPC_TLS", "").strip().lower()
        if value not in _TRUE + _FALSE:
            raise SettingError(f"VENNA_GRPC_TLS: expected 1/true/yes or 0/false/no, got '{value}'")
        enabled = value in _TRUE
    cert, key = options.grpc_client_cert, options.grpc_client_key
    if (cert is None) != (key is None):
        raise SettingError("--grpc-client-cert and --grpc-client-key go together: give both, or neither")
    if not (enabled or options.grpc_ca or cert or options.grpc_server_name):
        return None
    return ChannelTls(options.grpc_ca, cert, key, options.grpc_server_name)


def _tls_error(error: TlsFileError | HttpTlsFileError) -> SettingError:
    """A TLS file that cannot serve, as the flag that named it."""
    return SettingError(f"{_TLS_FLAGS[error.field]} {error.path}: {error.reason}")


def _serve_config(options: argparse.Namespace) -> ServerConfig:
    """The server's settings from ``venna serve``'s flags; ValueError names a bad one."""
    return ServerConfig(
        grpc_listen=options.grpc_listen,
        db_path=options.db,
        shutdown_grace=options.shutdown_grace,
        background_concurrency=options.background_concurrency,
        lease_seconds=options.lease_seconds,
        routing_config=options.config,
        key_cache_seconds=options.key_cache_seconds,
        tls=_tls_files(options),
        **_limit_settings(options),  # type: ignore[arg-type]  # each flag's type is its field's
    )


def _time_bound(value: str) -> int:
    """Unix seconds from unix seconds or an ISO date (-time), UTC unless it names a zone."""
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD or unix seconds, got '{value}'") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _os_error(error: OSError) -> str:
    """``error`` as one line: the file it is about and why, without errno's decoration."""
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return error.strerror or str(error)


class SettingError(Exception):
    """A setting the command cannot start with: reported in one line, exit status 2."""


def check_listen(flag: str, address: str) -> None:
    """Raises SettingError unless ``address`` is HOST:PORT that this process could listen on
    now: checked before anything starts, so that a taken port is one line, not a half-started
    server."""
    try:
        host, port = split_address(address)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except ValueError as error:
        raise SettingError(f"{flag} {address}: {error}") from None
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise SettingError(f"{flag} {address}: cannot resolve the host ({reason})") from None
    family, kind, protocol, _, socket_address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        # As the servers do: a port whose last connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(socket_address)
        except OSError as error:
            raise SettingError(f"{flag} {address}: cannot listen ({error.strerror or error})") from None


async def serve(
    config: ServerConfig,
    http_listen: str | None,
    http_limits: ConnectionLimits = DEFAULT_LIMITS,
    metrics_listen: str = "",
    drain_seconds: float = 0.0,
    cors_origins: Sequence[str] = (),
) -> None:
    """Runs gRPC (and the HTTP shim, in process) until SIGTERM or SIGINT, then shuts down
    gracefully. Whatever stops it from starting (a taken port, a database it cannot open, a bad
    routing table, a TLS file that cannot serve) is a SettingError. ``config.tls`` applies to
    every port: gRPC, the HTTP shim and the metrics exporter."""
    if config.tls is not None:
        try:
            config.tls.read()
        except TlsFileError as error:
            raise _tls_error(error) from None
    check_listen("--grpc-listen", config.grpc_listen)
    if http_listen:
        check_listen("--http-listen", http_listen)
    if metrics_listen:
        check_listen("--metrics-listen", metrics_listen)
    try:
        server = VennaServer(config)
    except StoreUnavailable as error:
        raise SettingError(f"--db {error}") from None
    except OSError as error:
        raise SettingError(_os_error(error)) from None
    except ValueError as error:
        raise SettingError(str(error)) from None
    try:
        await server.start()
    except StoreUnavailable as error:
        await server.stop(0)
        raise SettingError(f"--db {error}") from None
    except (OSError, ValueError) as error:
        await server.stop(0)
        raise SettingError(str(error)) from None
    http = None
    if http_listen:
        http = HttpServer(
            create_app(
                InProcessClient(server.handler, check_key=server.authenticator.verify),
                max_body_bytes=config.max_request_bytes,
                metrics=server.metrics.exposition,
                ready=server.ready,
                cors_origins=cors_origins,
            ),
            http_listen,
            config.shutdown_grace,
            http_limits,
            tls=_http_tls(config.tls),
        )
        try:
            await http.start()
        except OSError as error:
            await server.stop(0)
            raise SettingError(f"--http-listen {error}") from None
        except HttpTlsFileError as error:
            await server.stop(0)
            raise _tls_error(error) from None
    exporter = None
    if metrics_listen:
        exporter = HttpServer(
            create_metrics_app(server.metrics.exposition, server.ready),
            metrics_listen,
            config.shutdown_grace,
            http_limits,
            tls=_http_tls(config.tls),
        )
        try:
            await exporter.start()
        except OSError as error:
            await server.stop(0)
            if http is not None:
                await http.stop()
            raise SettingError(
                f"--metrics-listen {metrics_listen}: cannot listen ({error.strerror or error})"
            ) from None
        except HttpTlsFileError as error:
            await server.stop(0)
            raise _tls_error(error) from None
    where = f", HTTP on {http.scheme}://{http.address}/v1" if http else ""
    secured = ""
    if config.tls is not None:
        secured = ", mutual TLS (client certificates required)" if config.tls.client_ca else ", TLS"
    _freeze_startup_objects()
    stop = stop_signals()  # before the start-up line: a signal sent once it is read is caught
    print(f"venna: gRPC on {server.address}{where}, database {describe(config.db_path)}{secured}", flush=True)
    await stop.wait()
    if drain_seconds > 0:
        log.info("draining: reporting not ready for %.1fs before closing", drain_seconds)
    await server.announce_drain(drain_seconds)
    log.info("shutting down (grace %.1fs)", config.shutdown_grace)
    await asyncio.gather(server.drain(), http.stop() if http else asyncio.sleep(0))
    await server.close()
    if exporter is not None:
        await exporter.stop()


async def serve_http(
    grpc_target: str,
    http_listen: str,
    *,
    max_body_bytes: int = DEFAULTS.max_request_bytes,
    limits: ConnectionLimits = DEFAULT_LIMITS,
    cors_origins: Sequence[str] = (),
    tls: HttpTls | None = None,
    grpc_tls: ChannelTls | None = None,
) -> None:
    """The shim alone, calling a Venna gRPC service over a channel: HTTPS on its own port with
    ``tls``, and the channel (its health checks included) over TLS with ``grpc_tls``."""
    check_listen("--http-listen", http_listen)
    try:
        if tls is not None:
            tls.check()
        channel = open_channel(grpc_target, grpc_tls)
    except HttpTlsFileError as error:
        raise _tls_error(error) from None
    health = health_pb2_grpc.HealthStub(channel)

    async def target_serving() -> bool:
        """Ready while the gRPC target answers its health check SERVING within a second."""
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    http = HttpServer(
        create_app(
            ChannelClient(channel),
            max_body_bytes=max_body_bytes,
            ready=target_serving,
            cors_origins=cors_origins,
        ),
        http_listen,
        limits=limits,
        tls=tls,
    )
    try:
        await http.start()
    except OSError as error:
        await channel.close(grace=None)
        raise SettingError(f"--http-listen {error}") from None
    _freeze_startup_objects()
    stop = stop_signals()
    over = " over TLS" if grpc_tls is not None else ""
    secured = ", client certificates required" if tls is not None and tls.client_ca else ""
    print(
        f"venna: HTTP on {http.scheme}://{http.address}/v1{secured}, calling gRPC at {grpc_target}{over}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await http.stop()
        await channel.close(grace=None)


def _freeze_startup_objects() -> None:
    """Leaves everything that exists once the server runs (modules, descriptors, handlers: some
    45,000 objects) out of the garbage collector's full collections. Each full collection
    walked them all and stalled every call for up to 20 ms, several times a minute under load;
    now one takes 1 to 3 ms."""
    gc.collect()
    gc.freeze()


def _when(timestamp: int | None) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if timestamp else "-"


_USAGE_COLUMNS = ("responses", "input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens")


def _table_row(label: str, total: UsageTotal, width: int) -> str:
    counts = [getattr(total, column) for column in (*_USAGE_COLUMNS, "total_tokens")]
    return f"{label:<{width}}" + "".join(f" {count:>12}" for count in counts)


async def usage_report(store: ResponseStore, options: argparse.Namespace) -> int:
    """``venna usage``: a table (or JSON) of token totals per workspace."""
    if options.since is not None and options.until is not None and options.since > options.until:
        print("venna: --since is after --until", file=sys.stderr)
        return 1
    workspaces = await store.list_workspaces()
    if options.workspace is not None:
        workspaces = [workspace for workspace in workspaces if workspace.name == options.workspace]
        if not workspaces:
            print(f"venna: no workspace named '{options.workspace}'", file=sys.stderr)
            return 1
    reports = []
    for workspace in workspaces:
        buckets = await store.usage_totals(
            workspace.id, since=options.since, until=options.until, group_by_model=options.by_model
        )
        reports.append((workspace, buckets, sum_usage(buckets)))
    if options.json:
        document = {
            "since": options.since,
            "until": options.until,
            "workspaces": [
                {
                    "workspace": workspace.name,
                    "workspace_id": workspace.id,
                    "buckets": [dataclasses.asdict(bucket) for bucket in buckets],
                    "total": dataclasses.asdict(total),
                }
                for workspace, buckets, total in reports
            ],
        }
        print(json.dumps(document, indent=2))
        return 0
    since = _when(options.since) if options.since is not None else "the start"
    until = _when(options.until) if options.until is not None else "now"
    print(f"responses created from {since} until {until}")
    for workspace, buckets, total in reports:
        width = max([5, *(len(bucket.model or "") for bucket in buckets)])
        print(f"\nworkspace {workspace.name} ({workspace.id})")
        header = ("RESPONSES", "INPUT", "OUTPUT", "REASONING", "CACHED", "TOTAL")
        print(f"{'MODEL':<{width}}" + "".join(f" {title:>12}" for title in header))
        if options.by_model:
            for bucket in buckets:
                print(_table_row(bucket.model or "", bucket, width))
        print(_table_row("all", total, width))
    return 0


def _start_tracing(options: argparse.Namespace) -> Callable[[], None]:
    """--traces, switched on before anything is built (servers and upstream sessions read the
    switch as they are made); what flushes and stops them."""
    try:
        return start_tracing(options.traces, shim=options.command == "http")
    except TracingUnavailable as error:
        raise SettingError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    options = _build_parser().parse_args(argv)
    if options.command in ("serve", "http"):
        configure_logging(options.log_level, options.log_format)
    if options.command in ("serve", "http"):
        stop_tracing: Callable[[], None] | None = None
        try:
            stop_tracing = _start_tracing(options)
            if options.command == "http":
                limits = _http_limits(options)
                asyncio.run(
                    serve_http(
                        options.grpc_target,
                        options.http_listen,
                        max_body_bytes=options.max_request_bytes,
                        limits=limits,
                        cors_origins=_origins(options.cors_origins),
                        tls=_http_tls(_tls_files(options)),
                        grpc_tls=_channel_tls(options),
                    )
                )
            else:
                config, limits = _serve_config(options), _http_limits(options)
                http_listen = None if options.no_http else options.http_listen
                asyncio.run(
                    serve(
                        config,
                        http_listen,
                        limits,
                        options.metrics_listen,
                        options.drain_seconds,
                        _origins(options.cors_origins),
                    )
                )
        except (SettingError, ValueError) as error:
            # A setting it cannot start with: one line, the status of a usage error.
            print(f"venna: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"venna: {error}", file=sys.stderr)
            return 1
        finally:
            if stop_tracing is not None:
                stop_tracing()  # after the drain: the last spans are flushed, then the exporter stops
        return 0

    if options.command == "db":
        return asyncio.run(copy_command(options))
    return asyncio.run(store_command(options))


async def copy_command(options: argparse.Namespace) -> int:
    """``venna db copy``: a SQLite store into PostgreSQL, for a move to several replicas."""
    try:
        rows = await copy_store(options.source, options.target)
    except StoreUnavailable as error:
        print(f"venna: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"venna: {_os_error(error) if isinstance(error, OSError) else error}", file=sys.stderr)
        return 2
    copied = ", ".join(f"{count} {table}" for table, count in rows.items())
    print(f"copied {options.source} to {describe(options.target)}: {copied}", file=sys.stderr)
    return 0


def _count(text: str) -> int:
    """A limit: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (no limit) or more, got {value}")
    return value


def _limit_text(value: int | None) -> str:
    return "-" if value is None else str(value)


async def workspaces_command(store: ResponseStore, options: argparse.Namespace) -> int:
    if options.workspaces_command == "revoke":
        revoked = await store.revoke_workspace(options.name)
        if revoked is None:
            print(f"venna: no workspace named '{options.name}'", file=sys.stderr)
            return 1
        print(f"revoked workspace '{revoked.name}' and its keys", file=sys.stderr)
        return 0
    print(f"{'NAME':<20} {'ID':<28} {'CREATED':<21} {'REVOKED':<21} {'RPM':>8} {'TPM':>10} {'MONTHLY':>12}")
    for workspace in await store.list_workspaces():
        limits = await store.get_limits(workspace.id)
        print(
            f"{workspace.name:<20} {workspace.id:<28} {_when(workspace.created_at):<21}"
            f" {_when(workspace.revoked_at):<21} {_limit_text(limits.requests_per_minute):>8}"
            f" {_limit_text(limits.tokens_per_minute):>10} {_limit_text(limits.monthly_tokens):>12}"
        )
    return 0


async def limits_command(store: ResponseStore, options: argparse.Namespace) -> int:
    workspace = await store.get_workspace(options.workspace)
    if workspace is None:
        print(f"venna: no workspace named '{options.workspace}'", file=sys.stderr)
        return 1
    limits = await store.get_limits(workspace.id)
    if options.limits_command == "set":
        changes = {
            name: getattr(options, name)
            for name in ("requests_per_minute", "tokens_per_minute", "monthly_tokens")
            if getattr(options, name) is not None
        }
        if not changes:
            print(
                "venna: give at least one of --requests-per-minute, --tokens-per-minute, --monthly-tokens",
                file=sys.stderr,
            )
            return 2
        limits = dataclasses.replace(limits, **{name: value or None for name, value in changes.items()})
        await store.set_limits(workspace.id, limits)
    print(
        f"workspace '{workspace.name}': requests per minute {_limit_text(limits.requests_per_minute)},"
        f" tokens per minute {_limit_text(limits.tokens_per_minute)},"
        f" monthly tokens {_limit_text(limits.monthly_tokens)}"
    )
    return 0


async def store_command(options: argparse.Namespace) -> int:
    """``venna keys …`` and ``venna usage``: the store's maintenance, without a server."""
    try:
        store = open_store(options.db)
        await store.open()
    except StoreUnavailable as error:
        print(f"venna: --db {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"venna: --db {options.db}: {_os_error(error)}", file=sys.stderr)
        return 2
    try:
        if options.command == "usage":
            return await usage_report(store, options)
        if options.command == "workspaces":
            return await workspaces_command(store, options)
        if options.command == "limits":
            return await limits_command(store, options)
        if options.keys_command == "create":
            if options.admin:
                key, record = await store.create_admin_key()
                print(f"created admin key {record.id} (shown once):", file=sys.stderr)
            else:
                try:
                    key, record = await store.create_key(options.workspace)
                except WorkspaceUnavailable as error:
                    print(f"venna: {error}", file=sys.stderr)
                    return 1
                print(
                    f"created key {record.id} for workspace '{record.workspace}' (shown once):",
                    file=sys.stderr,
                )
            print(key)
        elif options.keys_command == "list":
            print(f"{'ID':<22} {'WORKSPACE':<20} {'KEY':<15} {'CREATED':<21} REVOKED")
            for record in await store.list_keys(options.workspace):
                print(
                    f"{record.id:<22} {record.workspace or '(admin)':<20} {record.hint:<15} "
                    f"{_when(record.created_at):<21} {_when(record.revoked_at)}"
                )
        elif options.keys_command == "revoke":
            if not await store.revoke_key(options.key_id):
                print(f"venna: no active key with id '{options.key_id}'", file=sys.stderr)
                return 1
            print(f"revoked {options.key_id}", file=sys.stderr)
    finally:
        await store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
