"""The store's interface: what the server asks of durable state, in the domain's terms.

Every engine (SQLite, PostgreSQL) implements ``ResponseStore`` and passes the same contract
tests (tests/test_store_contract.py). Rules every implementation keeps:

* Every record belongs to a workspace and every read filters on it: an id of another workspace
  is indistinguishable from an unknown one.
* A response stores its own new input items and its output items, never a copy of the history;
  ``load_context`` rebuilds a chain's conversation.
* A record that cannot be decoded fails the calls that need it (``UnreadableRecord``), never the
  others, and never the server's start.
* Methods return awaitables and may be called concurrently from one event loop; writes queued
  together may share a commit, each succeeding or failing on its own.

Leases. Several processes may share one store (PostgreSQL). An unfinished response is held by
the process that runs it, through a lease that process renews; its writes carry the lease and
are refused (nothing written) once another process holds the response. A process whose lease
expired (a crash, a partition) loses its responses to the first process that claims them: a
queued one is run again there, an in-progress one is settled as failed. Owner identity is the
fence; the clock only decides when a lease may be claimed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from venna.responses.v1 import conversations_pb2, events_pb2, response_pb2, service_pb2


class StoreUnavailable(Exception):
    """The store cannot be opened (a file that is not a database, a server that refuses)."""


class WorkspaceUnavailable(Exception):
    """A key cannot be made for the workspace: it does not exist, or it was revoked."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    # The workspace's name; empty for an admin key.
    workspace: str
    hint: str
    created_at: int
    revoked_at: int | None
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    name: str
    created_at: int
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class WorkspaceLimits:
    """What a workspace may use; None is no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_tokens: int | None = None

    @property
    def any(self) -> bool:
        return (
            self.requests_per_minute is not None
            or self.tokens_per_minute is not None
            or self.monthly_tokens is not None
        )


@dataclass(frozen=True, slots=True)
class WindowUse:
    """What a workspace used in one rate window (a minute): requests admitted, tokens recorded."""

    requests: int
    tokens: int


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Token totals of usage records: of one model, or of all of them (``model`` None)."""

    model: str | None
    responses: int
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    total_tokens: int


def sum_usage(totals: Sequence[UsageTotal]) -> UsageTotal:
    """One total (model None) over several, e.g. over the per-model totals."""
    return UsageTotal(
        model=None,
        responses=sum(total.responses for total in totals),
        input_tokens=sum(total.input_tokens for total in totals),
        output_tokens=sum(total.output_tokens for total in totals),
        reasoning_tokens=sum(total.reasoning_tokens for total in totals),
        cached_tokens=sum(total.cached_tokens for total in totals),
        total_tokens=sum(total.total_tokens for total in totals),
    )


@dataclass(frozen=True, slots=True)
class InputItemsPage:
    items: list[response_pb2.Item]
    has_more: bool


@dataclass(frozen=True, slots=True)
class PendingResponse:
    """An unfinished response claimed from a process that no longer holds it."""

    workspace_id: str
    response: response_pb2.Response
    request: service_pb2.CreateResponseRequest | None
    # The stored body or request could not be decoded: ``response`` is then a placeholder
    # (``unreadable_response``) with the row's status, and ``request`` is None.
    unreadable: bool = False
    # Somebody asked to cancel it before its owner was lost.
    cancelling: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A process's hold on the unfinished responses it runs (see "Leases" above).

    ``owner`` names the process (one per ``venna serve``, new at each start); each grant or
    renewal lasts ``milliseconds``, counted by the store's clock.
    """

    owner: str
    milliseconds: int


@dataclass(frozen=True, slots=True)
class Renewal:
    """What renewing a lease found: responses no longer held (finished, deleted, or claimed by
    another process) and responses somebody asked to cancel."""

    lost: frozenset[str]
    cancelling: frozenset[str]


class UnreadableRecord(Exception):
    """A stored record that cannot be decoded (corrupt bytes, or a message nested deeper than
    protobuf's parser accepts although its serializer wrote it).

    Raised per row, so that one such record fails the calls that need it and nothing else.
    ``item_id`` names the unreadable item, if it was an item; ``readable`` holds the events
    read before an unreadable one (``events_after``).
    """

    def __init__(
        self,
        response_id: str,
        *,
        created_at: int = 0,
        background: bool = False,
        item_id: str | None = None,
        readable: Sequence[events_pb2.ResponseStreamEvent] = (),
    ) -> None:
        super().__init__(f"stored record of response {response_id} cannot be decoded")
        self.response_id = response_id
        self.created_at = created_at
        self.background = background
        self.item_id = item_id
        self.readable = list(readable)


class ChainTooDeep(Exception):
    """A ``previous_response_id`` chain longer than the limit a caller gave."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"chain longer than {limit} responses")
        self.limit = limit


UNREADABLE_MESSAGE = "The stored response could not be read."


def unreadable_response(
    response_id: str, created_at: int, *, background: bool, status: int = response_pb2.RESPONSE_STATUS_FAILED
) -> response_pb2.Response:
    """What is known of a response whose stored body cannot be decoded: its id, creation
    time and kind from the row's columns, failed with ``server_error``."""
    response = response_pb2.Response(
        id=response_id, object="response", created_at=created_at, background=background
    )
    response.status = status  # type: ignore[assignment]  # the row's status column
    response.error.code = "server_error"
    response.error.message = UNREADABLE_MESSAGE
    return response


def item_id(item: response_pb2.Item) -> str:
    """The id of whichever member of the item union is set."""
    kind = item.WhichOneof("item")
    return getattr(item, kind).id if kind else ""


class EventWatch(Protocol):
    """Wake-ups for a follower of one response's stored events (see ResponseStore.watch_events)."""

    async def wait(self, seconds: float) -> None:
        """Returns once events of the response may have been stored since the previous wait (or
        since the watch began), or after ``seconds``."""
        ...

    def close(self) -> None: ...


class ResponseStore(Protocol):
    """Durable state: workspace keys, responses with their items and stream events, usage."""

    # ------------------------------------------------------------------ keys and workspaces

    def create_key(
        self, workspace_name: str, *, create_workspace: bool = True
    ) -> Awaitable[tuple[str, KeyRecord]]:
        """A new key of the workspace (created if new and ``create_workspace``); the plaintext
        is returned only here. Raises WorkspaceUnavailable for a revoked workspace, or for an
        unknown one when it may not be created."""
        ...

    def create_admin_key(self) -> Awaitable[tuple[str, KeyRecord]]:
        """A new admin key (of no workspace); the plaintext is returned only here."""
        ...

    def list_keys(self, workspace_name: str | None = None) -> Awaitable[list[KeyRecord]]:
        """Keys, oldest first: of one workspace, or every key (admin keys included)."""
        ...

    def revoke_key(self, key_id: str) -> Awaitable[bool]:
        """False if there is no active key (workspace or admin) with that id."""
        ...

    def create_workspace(self, name: str) -> Awaitable[Workspace | None]:
        """A new workspace; None if the name is taken."""
        ...

    def get_workspace(self, name: str) -> Awaitable[Workspace | None]: ...

    def revoke_workspace(self, name: str) -> Awaitable[Workspace | None]:
        """Revokes the workspace and every key of it (its data stays); None if unknown."""
        ...

    def list_workspaces(self) -> Awaitable[list[Workspace]]: ...

    def authenticate(self, key: str) -> Awaitable[str | None]:
        """The workspace id of a valid, unrevoked workspace key; None otherwise (admin keys
        included)."""
        ...

    def authenticate_admin(self, key: str) -> Awaitable[str | None]:
        """The id of a valid, unrevoked admin key; None otherwise."""
        ...

    def on_key_revoked(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` (on the event loop) whenever a key is revoked: by this store, and,
        where the engine can tell, by any other process on the same store."""
        ...

    # ------------------------------------------------------------------ responses

    def create_response(
        self,
        workspace_id: str,
        response: response_pb2.Response,
        input_items: Sequence[response_pb2.Item],
        *,
        request: service_pb2.CreateResponseRequest | None = None,
        events: Sequence[events_pb2.ResponseStreamEvent] = (),
        finished: bool = False,
        lease: Lease | None = None,
    ) -> Awaitable[None]:
        """Stores a new response with its input and output items, as they are at the call.

        ``request`` is kept for background work (to run it again after a restart), ``events``
        are its first stream events, ``finished`` records its usage too, and ``lease`` makes
        the caller hold the (unfinished) response.
        """
        ...

    def save_response(
        self,
        workspace_id: str,
        response: response_pb2.Response,
        *,
        events: Sequence[events_pb2.ResponseStreamEvent] = (),
        finished: bool = False,
        lease: Lease | None = None,
    ) -> Awaitable[bool]:
        """Updates a stored response (status, body, output) and appends ``events``, together;
        False if it no longer exists. ``finished`` drops the kept request and records usage,
        even for a response deleted meanwhile: its tokens were spent all the same.

        With ``lease``, only while the lease holds the response (it is renewed; a finished
        save releases it): otherwise nothing is written and the answer is False (a usage
        record is still written for a deleted response, never over another process's)."""
        ...

    def append_events(
        self,
        response_id: str,
        events: Sequence[events_pb2.ResponseStreamEvent],
        *,
        lease: Lease | None = None,
    ) -> Awaitable[bool]:
        """Stores more stream events of a response (an event stored twice is kept once). With
        ``lease``, only while it holds the response (renewing it); False if nothing was stored."""
        ...

    def record_usage(self, workspace_id: str, response: response_pb2.Response) -> Awaitable[None]:
        """The usage record of a finished response that is not stored (``store: false``)."""
        ...

    def get_response(self, workspace_id: str, response_id: str) -> Awaitable[response_pb2.Response | None]:
        """The stored response with its output; None if unknown in this workspace. Raises
        UnreadableRecord if it cannot be decoded."""
        ...

    def delete_response(self, workspace_id: str, response_id: str) -> Awaitable[bool]:
        """Deletes the response with its items and events; False if unknown in this workspace."""
        ...

    def load_context(
        self, workspace_id: str, response_id: str, *, max_depth: int | None = None
    ) -> Awaitable[list[response_pb2.Item] | None]:
        """The conversation up to and including ``response_id``, oldest first: per response,
        its input items then its output items. None if unknown in this workspace; ChainTooDeep
        past ``max_depth`` responses before it; UnreadableRecord for an item it cannot decode."""
        ...

    def find_items(
        self, workspace_id: str, item_ids: Sequence[str]
    ) -> Awaitable[dict[str, response_pb2.Item]]:
        """Stored items of this workspace by id; ids not found are absent."""
        ...

    def list_input_items(
        self, workspace_id: str, response_id: str, *, limit: int, ascending: bool, after: str | None
    ) -> Awaitable[InputItemsPage | None]:
        """A page of a response's own input items; None if the response is unknown, LookupError
        if ``after`` is not one of its input items."""
        ...

    def events_after(
        self, workspace_id: str, response_id: str, after: int
    ) -> Awaitable[list[events_pb2.ResponseStreamEvent]]:
        """The stored events numbered above ``after``, in order (none for another workspace's)."""
        ...

    def watch_events(self, response_id: str) -> EventWatch:
        """Wake-ups when the response's events or state are stored, by this process or, where the
        engine can tell, by any other (otherwise the wait just times out: a slow poll). The stored
        events stay the source of truth: a wake-up only says to read them again."""
        ...

    def last_sequence_number(self, response_id: str) -> Awaitable[int]:
        """The number of the response's last stored event; -1 if it has none."""
        ...

    def last_terminal_event(self, response_id: str) -> Awaitable[events_pb2.ResponseStreamEvent | None]:
        """The last stored event if it ends the stream (completed, incomplete, failed)."""
        ...

    # ------------------------------------------------------------------ leases

    @property
    def shared(self) -> bool:
        """Whether other processes may use this store at the same time. If not, a process
        starting takes over every unfinished response at once instead of waiting for leases to
        expire."""
        ...

    def claim_responses(
        self, lease: Lease, *, queued: int, expired_only: bool = True
    ) -> Awaitable[list[PendingResponse]]:
        """Holds, with ``lease``, the unfinished responses nobody holds (their lease expired or
        was released): every one in progress, and up to ``queued`` queued ones, oldest first.
        ``expired_only`` False takes them whatever their lease. A row that cannot be decoded
        comes as ``unreadable``, never as an error."""
        ...

    def renew_leases(self, lease: Lease, response_ids: Sequence[str]) -> Awaitable[Renewal]:
        """Extends the lease on those of ``response_ids`` it still holds."""
        ...

    def release_leases(self, lease: Lease, response_ids: Sequence[str]) -> Awaitable[None]:
        """Lets any process claim these responses at once (a process stopping with work queued)."""
        ...

    def take_over(self, lease: Lease, workspace_id: str, response_id: str) -> Awaitable[bool]:
        """Holds the response with ``lease`` whoever held it (an owner that did not answer a
        cancel); False if it is unknown or finished."""
        ...

    def request_cancel(self, workspace_id: str, response_id: str) -> Awaitable[bool]:
        """Marks an unfinished response for cancelling and tells its owner (see
        ``on_cancel_requested``); False if it is unknown or finished."""
        ...

    def on_cancel_requested(self, callback: Callable[[str], None]) -> None:
        """Calls ``callback(response_id)`` (on the event loop) when a cancel is requested: by
        this store, and, where the engine can tell, by any other process. Owners also learn it
        when they renew their leases."""
        ...

    # ------------------------------------------------------------------ conversations

    def create_conversation(
        self,
        workspace_id: str,
        conversation: conversations_pb2.Conversation,
        items: Sequence[response_pb2.Item],
    ) -> Awaitable[None]:
        """Stores a new conversation with its first items, in order."""
        ...

    def get_conversation(
        self, workspace_id: str, conversation_id: str
    ) -> Awaitable[conversations_pb2.Conversation | None]:
        """The workspace's conversation, or None (unknown, deleted, or another workspace's)."""
        ...

    def update_conversation(
        self, workspace_id: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> Awaitable[conversations_pb2.Conversation | None]:
        """Replaces the metadata; the updated conversation, or None if it is not found."""
        ...

    def delete_conversation(self, workspace_id: str, conversation_id: str) -> Awaitable[bool]:
        """Deletes the conversation and its items; False if it is not found."""
        ...

    def add_conversation_items(
        self, workspace_id: str, conversation_id: str, items: Sequence[response_pb2.Item]
    ) -> Awaitable[bool]:
        """Appends items after the conversation's last; False if it is not found."""
        ...

    def conversation_items(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        limit: int | None = None,
        ascending: bool = True,
        after: str | None = None,
    ) -> Awaitable[InputItemsPage | None]:
        """The conversation's items in order (a page of ``limit`` after the item ``after``, or
        all of them); None if it is not found. Raises LookupError if ``after`` is not one of its
        items."""
        ...

    def get_conversation_item(
        self, workspace_id: str, conversation_id: str, item_id: str
    ) -> Awaitable[response_pb2.Item | None]:
        """One item of the conversation; None if either is not found."""
        ...

    def delete_conversation_item(
        self, workspace_id: str, conversation_id: str, item_id: str
    ) -> Awaitable[bool]:
        """Removes one item of the conversation; False if either is not found."""
        ...

    # ------------------------------------------------------------------ usage

    def usage_totals(
        self,
        workspace_id: str,
        *,
        since: int | None = None,
        until: int | None = None,
        group_by_model: bool = False,
    ) -> Awaitable[list[UsageTotal]]:
        """Token totals of the workspace's responses created in [since, until), per model or as
        one total; none for an empty range."""
        ...

    # ------------------------------------------------------------------ limits

    def set_limits(self, workspace_id: str, limits: WorkspaceLimits) -> Awaitable[None]:
        """Replaces the workspace's limits."""
        ...

    def get_limits(self, workspace_id: str) -> Awaitable[WorkspaceLimits]:
        """The workspace's limits; none set is ``WorkspaceLimits()``."""
        ...

    def take_requests(
        self, workspace_id: str, window: int, count: int, *, max_requests: int | None, max_tokens: int | None
    ) -> Awaitable[tuple[int, WindowUse]]:
        """Counts up to ``count`` requests in the workspace's rate window ``window`` (a minute's
        start, unix seconds): as many as keep the window at most ``max_requests`` requests, and
        none once it has ``max_tokens`` tokens (None: no bound); atomically for every process on
        the store. How many were counted, and the window's use after."""
        ...

    def add_window_tokens(self, workspace_id: str, window: int, tokens: int) -> Awaitable[None]:
        """Adds tokens of finished responses to the workspace's rate window."""
        ...

    def window_use(self, workspace_id: str, window: int) -> Awaitable[WindowUse]:
        """The workspace's use of one rate window (zero when none was recorded)."""
        ...

    def prune_windows(self, before: int) -> Awaitable[None]:
        """Forgets every rate window that starts before ``before``."""
        ...

    def observe_commits(self, observer: Callable[[int, float], None]) -> None:
        """Calls ``observer(writes, seconds)`` after each commit of queued writes: how many
        shared it and how long it took (metrics). May be called from the store's own thread."""
        ...

    def ping(self) -> Awaitable[None]:
        """Returns once the store answered a trivial query; raises if it cannot be reached
        (readiness probes)."""
        ...

    # ------------------------------------------------------------------ lifecycle

    def open(self, *, serving: bool = False) -> Awaitable[None]:
        """Connects and brings the schema up to date; before any other call. Raises
        StoreUnavailable if the store cannot be reached or is not a Venna store, or if
        ``serving`` (this process runs responses) and the store allows one such process only
        and another holds it."""
        ...

    def close(self) -> Awaitable[None]:
        """Finishes the writes already queued, then releases the store."""
        ...
