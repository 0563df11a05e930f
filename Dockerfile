# Venna as a container image: `docker build -t venna .` from the repository root.
# See deploy/README.md for running it (a volume for the SQLite file, or a PostgreSQL URL).
#
# Two stages: the builder makes a wheel of this checkout and installs it, with its
# dependencies, into a virtualenv under /opt/venna; the runtime stage gets that virtualenv and
# nothing else (no compiler, no build tools, no sources). Every dependency ships wheels for
# CPython 3.11 on x86_64 and arm64 Linux, so the builder needs no compiler either.

ARG PYTHON_IMAGE=python:3.11-slim

# ----------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the wheel is built from. venna/ holds links to the folders beside it
# (venna/server -> ../server, ...), so those folders come along under their own names.
COPY pyproject.toml README.md LICENSE ./
COPY venna/ venna/
COPY backends/ backends/
COPY cli/ cli/
COPY gateway_http/ gateway_http/
COPY server/ server/
COPY protos/ protos/

# With the otel extra, so that `--traces otlp` works in the image (off unless asked for).
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venna \
    && /opt/venna/bin/pip install "$(echo /wheels/venna-*.whl)[otel]" \
    && /opt/venna/bin/pip uninstall --yes pip setuptools

# ----------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# A fixed uid and gid, so that volumes and Kubernetes' runAsUser can name them.
RUN groupadd --system --gid 10001 venna \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /var/lib/venna --no-create-home --shell /usr/sbin/nologin venna \
    && install --directory --owner=10001 --group=10001 --mode=0700 /var/lib/venna

COPY --from=builder /opt/venna /opt/venna

# Inside a container the server must listen on every interface (the defaults bind 127.0.0.1).
# Settings are environment variables rather than flags so that `docker run -e` can change any
# of them: VENNA_DB=postgresql://user:password@host:5432/venna moves the state to PostgreSQL.
ENV PATH="/opt/venna/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VENNA_DB=/var/lib/venna/venna.db \
    VENNA_GRPC_LISTEN=0.0.0.0:50051 \
    VENNA_HTTP_LISTEN=0.0.0.0:8080 \
    VENNA_LOG_FORMAT=json

WORKDIR /var/lib/venna
# The SQLite file (and its -wal and -shm files) live here; unused with a PostgreSQL URL.
VOLUME ["/var/lib/venna"]

USER 10001:10001

# gRPC, then the HTTP shim (which also serves /metrics, /livez, /readyz and /healthz).
EXPOSE 50051 8080

# The server drains on SIGTERM: give `docker stop` a timeout above --drain-seconds plus
# --shutdown-grace (default 0 + 10 s), e.g. `docker stop --time 30`.
STOPSIGNAL SIGTERM

# The image has no curl: the interpreter it already holds asks /livez on the shim's port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('VENNA_HTTP_LISTEN', '0.0.0.0:8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/livez', timeout=4)"]

ENTRYPOINT ["venna"]
CMD ["serve"]
