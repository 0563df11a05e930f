"""The admin API, over HTTP and gRPC through the real server: onboarding a workspace end to end
with an admin key, and the two kinds of keys kept apart (a workspace key never administers, an
admin key never acts as a tenant)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.http_harness import HttpVenna, running
from venna.responses.v1 import admin_pb2, admin_pb2_grpc, service_pb2, service_pb2_grpc


@pytest.fixture
def venna(tmp_path: Path) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path / "venna.db"))


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_platform_onboards_a_workspace_over_http(venna: HttpVenna) -> None:
    with httpx.Client(base_url=venna.base_url + "/admin", headers=bearer(venna.admin), timeout=10) as admin:
        made = admin.post("/workspaces", json={"name": "team-red"})
        assert made.status_code == 200, made.text
        workspace = made.json()
        assert workspace["object"] == "workspace" and workspace["name"] == "team-red"
        assert workspace["id"].startswith("ws_") and workspace["revoked_at"] is None
        assert workspace["limits"]["requests_per_minute"] is None

        again = admin.post("/workspaces", json={"name": "team-red"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "workspace_exists"
        bad = admin.post("/workspaces", json={"name": "no spaces/please"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"

        created = admin.post("/workspaces/team-red/keys", json={})
        assert created.status_code == 200, created.text
        secret, key = created.json()["secret"], created.json()["key"]
        assert secret.startswith("vk_") and key["workspace"] == "team-red" and secret not in key["hint"]
        answer = httpx.post(
            f"{venna.base_url}/responses", json={"model": "echo", "input": "hello"}, headers=bearer(secret)
        )
        assert answer.status_code == 200 and answer.json()["output"][0]["content"][0]["text"] == "hello"

        limits = admin.post(
            "/workspaces/team-red/limits", json={"requests_per_minute": 100, "monthly_tokens": 5000}
        )
        assert limits.json() == {
            "object": "workspace.limits",
            "requests_per_minute": 100,
            "tokens_per_minute": None,
            "monthly_tokens": 5000,
        }
        # Only the limits given change; 0 removes one.
        changed = admin.post(
            "/workspaces/team-red/limits", json={"requests_per_minute": 0, "tokens_per_minute": 9}
        )
        assert changed.json()["requests_per_minute"] is None and changed.json()["tokens_per_minute"] == 9
        assert changed.json()["monthly_tokens"] == 5000
        assert admin.get("/workspaces/team-red/limits").json() == changed.json()
        negative = admin.post("/workspaces/team-red/limits", json={"monthly_tokens": -1})
        assert negative.status_code == 400 and negative.json()["error"]["param"] == "monthly_tokens"

        usage = admin.get("/workspaces/team-red/usage").json()
        assert usage["object"] == "usage" and usage["total"]["responses"] == 1
        assert usage["total"]["total_tokens"] == answer.json()["usage"]["total_tokens"]

        names = [found["name"] for found in admin.get("/workspaces").json()["data"]]
        assert names == ["alpha", "beta", "team-red"]
        listed = admin.get("/keys", params={"workspace": "team-red"}).json()["data"]
        assert [found["id"] for found in listed] == [key["id"]]
        every = admin.get("/keys").json()["data"]
        assert [found["admin"] for found in every].count(True) == 1 and len(every) == 4
        assert admin.get("/workspaces/nobody").status_code == 404
        assert admin.get("/keys", params={"workspace": "nobody"}).status_code == 404

        revoked = admin.delete(f"/keys/{key['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        assert admin.delete(f"/keys/{key['id']}").status_code == 404
        refused = httpx.post(
            f"{venna.base_url}/responses", json={"model": "echo", "input": "x"}, headers=bearer(secret)
        )
        assert refused.status_code == 401

        second = admin.post("/workspaces/team-red/keys", json={}).json()["secret"]
        gone = admin.delete("/workspaces/team-red")
        assert gone.status_code == 200 and gone.json()["revoked_at"] is not None
        assert httpx.get(f"{venna.base_url}/models", headers=bearer(second)).status_code == 401
        after = admin.post("/workspaces/team-red/keys", json={})
        assert after.status_code == 400 and after.json()["error"]["code"] == "workspace_revoked"


def test_workspace_keys_never_administer_and_admin_keys_never_act_as_tenants(venna: HttpVenna) -> None:
    tenant = httpx.get(f"{venna.base_url}/admin/workspaces", headers=bearer(venna.alpha))
    assert tenant.status_code == 403, tenant.text
    assert tenant.json()["error"]["code"] == "admin_key_required"
    made = httpx.post(f"{venna.base_url}/admin/workspaces", json={"name": "x"}, headers=bearer(venna.alpha))
    assert made.status_code == 403
    assert httpx.get(f"{venna.base_url}/admin/workspaces").status_code == 401
    unknown = httpx.get(f"{venna.base_url}/admin/workspaces", headers=bearer("vka_" + "x" * 43))
    assert unknown.status_code == 401

    # Before its key is checked, an admin call's body is read only up to a small bound.
    large = httpx.post(
        f"{venna.base_url}/admin/workspaces",
        content=b'{"name": "' + b"x" * 100_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert large.status_code == 413, large.text

    as_tenant = httpx.post(
        f"{venna.base_url}/responses", json={"model": "echo", "input": "hi"}, headers=bearer(venna.admin)
    )
    assert as_tenant.status_code == 403, as_tenant.text
    assert as_tenant.json()["error"]["code"] == "admin_key_not_allowed"
    assert httpx.get(f"{venna.base_url}/usage", headers=bearer(venna.admin)).status_code == 403


def test_the_admin_service_over_grpc(venna: HttpVenna) -> None:
    with grpc.insecure_channel(venna.grpc_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        as_admin = (("authorization", f"Bearer {venna.admin}"),)
        made = admin.CreateWorkspace(admin_pb2.CreateWorkspaceRequest(name="grpc-team"), metadata=as_admin)
        assert made.name == "grpc-team" and not made.HasField("revoked_at")
        key = admin.CreateKey(admin_pb2.CreateKeyRequest(workspace="grpc-team"), metadata=as_admin)
        limits = admin.SetLimits(
            admin_pb2.SetLimitsRequest(workspace="grpc-team", tokens_per_minute=1000), metadata=as_admin
        )
        assert limits.tokens_per_minute == 1000 and not limits.HasField("requests_per_minute")

        with pytest.raises(grpc.RpcError) as denied:
            admin.ListWorkspaces(
                admin_pb2.ListWorkspacesRequest(), metadata=(("authorization", f"Bearer {key.secret}"),)
            )
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        status = rpc_status.from_call(denied.value)  # type: ignore[arg-type]
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(info)
        assert info.reason == "ADMIN_KEY_REQUIRED"

        responses = service_pb2_grpc.ResponsesServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            responses.CreateResponse(service_pb2.CreateResponseRequest(model="echo"), metadata=as_admin)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        answer = responses.CreateResponse(
            service_pb2.CreateResponseRequest(model="echo", input=[]),
            metadata=(("authorization", f"Bearer {key.secret}"),),
        )
        assert answer.id.startswith("resp_")


def test_the_cli_makes_admin_keys_and_sets_limits(tmp_path: Path) -> None:
    db = str(tmp_path / "venna.db")

    def venna(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "venna.cli", *args, "--db", db], capture_output=True, text=True, timeout=60
        )

    admin = venna("keys", "create", "--admin")
    assert admin.returncode == 0, admin.stderr
    assert admin.stdout.strip().startswith("vka_") and "admin key" in admin.stderr
    assert venna("keys", "create", "--workspace", "ops").returncode == 0
    limits = venna(
        "limits", "set", "--workspace", "ops", "--requests-per-minute", "60", "--monthly-tokens", "1000000"
    )
    assert limits.returncode == 0, limits.stderr
    assert "requests per minute 60" in limits.stdout and "monthly tokens 1000000" in limits.stdout
    cleared = venna("limits", "set", "--workspace", "ops", "--requests-per-minute", "0")
    assert "requests per minute -" in cleared.stdout and "monthly tokens 1000000" in cleared.stdout
    assert venna("limits", "set", "--workspace", "nobody", "--monthly-tokens", "5").returncode == 1
    negative = venna("limits", "set", "--workspace", "ops", "--monthly-tokens", "-5")
    assert negative.returncode == 2 and "0 (no limit) or more" in negative.stderr
    listing = venna("keys", "list")
    assert "(admin)" in listing.stdout and "ops" in listing.stdout
    workspaces = venna("workspaces", "list")
    assert "ops" in workspaces.stdout and "1000000" in workspaces.stdout
    assert venna("workspaces", "revoke", "ops").returncode == 0
    refused = venna("keys", "create", "--workspace", "ops")
    assert refused.returncode == 1 and "revoked" in refused.stderr
