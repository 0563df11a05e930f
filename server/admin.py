"""The Admin service: workspaces, keys, limits and usage, for a platform that automates
onboarding. Its calls are authorized by admin keys only (server/auth.py); it names workspaces by
their unique name, as the CLI does."""

from __future__ import annotations

import re

import grpc

from venna.backends.store import KeyRecord, ResponseStore, Workspace, WorkspaceLimits, WorkspaceUnavailable
from venna.responses.v1 import admin_pb2, admin_pb2_grpc, usage_pb2
from venna.server import auth
from venna.server.errors import ServiceError, invalid_argument, quoted
from venna.server.quotas import Quotas
from venna.server.usage import usage_report

WORKSPACE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Above any real limit, below what every engine stores.
MAX_LIMIT = 2**53


def check_workspace_name(name: str, param: str = "name") -> None:
    if not WORKSPACE_NAME.fullmatch(name):
        raise invalid_argument(
            param,
            f"Invalid '{param}': {quoted(name)!r} is not a workspace name (1 to 64 letters, digits,"
            " '.', '_' or '-').",
        )


def _workspace_not_found(name: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"No workspace named {quoted(name)!r}.",
        reason="WORKSPACE_NOT_FOUND",
        param="workspace",
    )


def limits_message(limits: WorkspaceLimits) -> admin_pb2.WorkspaceLimits:
    return admin_pb2.WorkspaceLimits(
        object="workspace.limits",
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        monthly_tokens=limits.monthly_tokens,
    )


def key_message(record: KeyRecord) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        object="api_key",
        id=record.id,
        workspace=record.workspace,
        hint=record.hint,
        created_at=record.created_at,
        revoked_at=record.revoked_at,
        admin=record.admin,
    )


def changed_limits(current: WorkspaceLimits, request: admin_pb2.SetLimitsRequest) -> WorkspaceLimits:
    """``current`` with the limits the request gives (0 removes one); raises for a negative or
    absurd value."""
    values: dict[str, int | None] = {
        "requests_per_minute": current.requests_per_minute,
        "tokens_per_minute": current.tokens_per_minute,
        "monthly_tokens": current.monthly_tokens,
    }
    for field, value in request.ListFields():
        name = field.name
        if name not in values:
            continue
        if not 0 <= value <= MAX_LIMIT:
            raise invalid_argument(
                name, f"Invalid '{name}': expected 0 (no limit) to {MAX_LIMIT}, got {value}."
            )
        values[name] = value or None
    return WorkspaceLimits(**values)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: ResponseStore, quotas: Quotas) -> None:
        self._store = store
        self._quotas = quotas

    async def _workspace(self, name: str) -> Workspace:
        if not name:
            raise invalid_argument(
                "workspace", "Missing required parameter: 'workspace'.", "MISSING_REQUIRED"
            )
        found = await self._store.get_workspace(name)
        if found is None:
            raise _workspace_not_found(name)
        return found

    async def _message(self, workspace: Workspace) -> admin_pb2.AdminWorkspace:
        return admin_pb2.AdminWorkspace(
            object="workspace",
            id=workspace.id,
            name=workspace.name,
            created_at=workspace.created_at,
            revoked_at=workspace.revoked_at,
            limits=limits_message(await self._store.get_limits(workspace.id)),
        )

    async def CreateWorkspace(
        self, request: admin_pb2.CreateWorkspaceRequest, context: auth.Context
    ) -> admin_pb2.AdminWorkspace:
        check_workspace_name(request.name)
        made = await self._store.create_workspace(request.name)
        if made is None:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"A workspace named {request.name!r} exists already.",
                reason="WORKSPACE_EXISTS",
                param="name",
            )
        return await self._message(made)

    async def ListWorkspaces(
        self, request: admin_pb2.ListWorkspacesRequest, context: auth.Context
    ) -> admin_pb2.ListWorkspacesResponse:
        workspaces = await self._store.list_workspaces()
        return admin_pb2.ListWorkspacesResponse(
            object="list", data=[await self._message(workspace) for workspace in workspaces]
        )

    async def GetWorkspace(
        self, request: admin_pb2.GetWorkspaceRequest, context: auth.Context
    ) -> admin_pb2.AdminWorkspace:
        return await self._message(await self._workspace(request.workspace))

    async def RevokeWorkspace(
        self, request: admin_pb2.RevokeWorkspaceRequest, context: auth.Context
    ) -> admin_pb2.AdminWorkspace:
        await self._workspace(request.workspace)
        revoked = await self._store.revoke_workspace(request.workspace)
        if revoked is None:
            raise _workspace_not_found(request.workspace)
        return await self._message(revoked)

    async def CreateKey(
        self, request: admin_pb2.CreateKeyRequest, context: auth.Context
    ) -> admin_pb2.CreateKeyResponse:
        await self._workspace(request.workspace)
        try:
            secret, record = await self._store.create_key(request.workspace, create_workspace=False)
        except WorkspaceUnavailable as error:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, str(error), reason="WORKSPACE_REVOKED", param="workspace"
            ) from None
        return admin_pb2.CreateKeyResponse(key=key_message(record), secret=secret)

    async def ListKeys(
        self, request: admin_pb2.ListKeysRequest, context: auth.Context
    ) -> admin_pb2.ListKeysResponse:
        name = request.workspace if request.HasField("workspace") else None
        if name is not None:
            await self._workspace(name)
        keys = await self._store.list_keys(name)
        return admin_pb2.ListKeysResponse(object="list", data=[key_message(key) for key in keys])

    async def RevokeKey(self, request: admin_pb2.RevokeKeyRequest, context: auth.Context) -> admin_pb2.ApiKey:
        if not await self._store.revoke_key(request.key_id):
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"No active key with id {quoted(request.key_id)!r}.",
                reason="KEY_NOT_FOUND",
                param="key_id",
            )
        revoked = [key for key in await self._store.list_keys() if key.id == request.key_id]
        return key_message(revoked[0])

    async def SetLimits(
        self, request: admin_pb2.SetLimitsRequest, context: auth.Context
    ) -> admin_pb2.WorkspaceLimits:
        workspace = await self._workspace(request.workspace)
        limits = changed_limits(await self._store.get_limits(workspace.id), request)
        await self._store.set_limits(workspace.id, limits)
        self._quotas.forget(workspace.id)
        return limits_message(limits)

    async def GetLimits(
        self, request: admin_pb2.GetLimitsRequest, context: auth.Context
    ) -> admin_pb2.WorkspaceLimits:
        workspace = await self._workspace(request.workspace)
        return limits_message(await self._store.get_limits(workspace.id))

    async def GetWorkspaceUsage(
        self, request: admin_pb2.GetWorkspaceUsageRequest, context: auth.Context
    ) -> usage_pb2.GetUsageResponse:
        workspace = await self._workspace(request.workspace)
        return await usage_report(
            self._store,
            workspace.id,
            request.start_time if request.HasField("start_time") else None,
            request.end_time if request.HasField("end_time") else None,
            group_by_model=request.group_by_model,
        )
