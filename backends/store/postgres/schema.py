"""The PostgreSQL schema: numbered migrations, applied at start under an advisory lock so that
replicas starting together apply each one once."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool

from venna.responses.v1 import response_pb2

# A connection of its own, or one lent by the pool.
Connection: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"

# Unfinished responses, by status: the only ones recovery looks for (a partial index).
UNFINISHED_STATUSES = f"{response_pb2.RESPONSE_STATUS_QUEUED}, {response_pb2.RESPONSE_STATUS_IN_PROGRESS}"

# The store's clock, in unix milliseconds: leases expire by the database's clock, the same for
# every replica.
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

# Any fixed number: the key of the advisory lock migrations are applied under.
_MIGRATION_LOCK = 0x76656E6E61  # "venna"

# (name, statements), applied in order; a name, once applied, is never applied again.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "m001_initial",
        f"""
        CREATE TABLE workspaces (
            id text PRIMARY KEY,
            name text NOT NULL UNIQUE,
            created_at bigint NOT NULL
        );
        CREATE TABLE api_keys (
            id text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY,  -- creation order, for listings
            workspace_id text NOT NULL REFERENCES workspaces (id),
            key_hash text NOT NULL UNIQUE,
            key_hint text NOT NULL,
            created_at bigint NOT NULL,
            revoked_at bigint
        );
        CREATE TABLE responses (
            id text PRIMARY KEY,
            workspace_id text NOT NULL,
            previous_response_id text,
            status integer NOT NULL,
            background boolean NOT NULL,
            created_at bigint NOT NULL,
            body bytea NOT NULL,      -- the Response without its output (that lives in items)
            request bytea             -- the CreateResponseRequest, kept until a background run ends
        );
        CREATE INDEX responses_unfinished ON responses (created_at)
            WHERE status IN ({UNFINISHED_STATUSES});
        CREATE TABLE items (
            seq bigserial PRIMARY KEY,
            workspace_id text NOT NULL,
            response_id text NOT NULL,
            item_id text NOT NULL,
            kind smallint NOT NULL,   -- 0 input, 1 output
            position integer NOT NULL,
            body bytea NOT NULL,
            UNIQUE (response_id, kind, position)
        );
        CREATE INDEX items_by_id ON items (workspace_id, item_id);
        CREATE TABLE events (
            response_id text NOT NULL,
            sequence_number integer NOT NULL,
            body bytea NOT NULL,
            PRIMARY KEY (response_id, sequence_number)
        );
        CREATE TABLE usage (
            response_id text PRIMARY KEY,
            workspace_id text NOT NULL,
            model text NOT NULL,
            status text NOT NULL,
            input_tokens bigint NOT NULL DEFAULT 0,
            output_tokens bigint NOT NULL DEFAULT 0,
            reasoning_tokens bigint NOT NULL DEFAULT 0,
            cached_tokens bigint NOT NULL DEFAULT 0,
            created_at bigint NOT NULL,
            finished_at bigint NOT NULL
        );
        CREATE INDEX usage_by_time ON usage (workspace_id, created_at);
        """,
    ),
    (
        # Who runs each unfinished response (the owner's lease, in unix milliseconds), and
        # whether somebody asked to cancel it. Responses already stored are nobody's.
        "m002_leases",
        """
        ALTER TABLE responses ADD COLUMN owner text;
        ALTER TABLE responses ADD COLUMN lease_until bigint;
        ALTER TABLE responses ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
        """,
    ),
    (
        # Conversations and their items, in the order they were added.
        "m003_conversations",
        """
        CREATE TABLE conversations (
            id text PRIMARY KEY,
            workspace_id text NOT NULL,
            created_at bigint NOT NULL,
            body bytea NOT NULL
        );
        CREATE TABLE conversation_items (
            seq bigserial PRIMARY KEY,
            conversation_id text NOT NULL,
            item_id text NOT NULL,
            body bytea NOT NULL
        );
        CREATE INDEX conversation_items_in_order ON conversation_items (conversation_id, seq);
        CREATE INDEX conversation_items_by_id ON conversation_items (conversation_id, item_id);
        """,
    ),
    (
        # Revoked workspaces, admin keys, limits per workspace and the rate windows that
        # enforce them on every replica.
        "m004_administration",
        """
        ALTER TABLE workspaces ADD COLUMN revoked_at bigint;
        CREATE TABLE admin_keys (
            id text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY,
            key_hash text NOT NULL UNIQUE,
            key_hint text NOT NULL,
            created_at bigint NOT NULL,
            revoked_at bigint
        );
        CREATE TABLE workspace_limits (
            workspace_id text PRIMARY KEY,
            requests_per_minute bigint,
            tokens_per_minute bigint,
            monthly_tokens bigint
        );
        CREATE TABLE rate_windows (
            workspace_id text NOT NULL,
            window_start bigint NOT NULL,
            requests bigint NOT NULL DEFAULT 0,
            tokens bigint NOT NULL DEFAULT 0,
            -- How many requests the latest update counted (what an update's RETURNING reports).
            last_taken bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (workspace_id, window_start)
        );
        """,
    ),
]


async def migrate(connection: Connection) -> list[str]:
    """Applies the migrations this database lacks, each in its own transaction; the names
    applied now."""
    await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS venna_migrations (name text PRIMARY KEY, applied_at timestamptz"
            " NOT NULL DEFAULT now())"
        )
        done = {row["name"] for row in await connection.fetch("SELECT name FROM venna_migrations")}
        applied = []
        for name, statements in MIGRATIONS:
            if name in done:
                continue
            async with connection.transaction():
                await connection.execute(statements)
                await connection.execute("INSERT INTO venna_migrations (name) VALUES ($1)", name)
            applied.append(name)
        return applied
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
