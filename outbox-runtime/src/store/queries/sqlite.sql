-- Queries for SQLite (3.35 or later, for RETURNING). `{table}` is the service's outbox table,
-- checked against [a-z_][a-z0-9_]* before it gets here. Each parameter appears once, in the
-- order the store binds it. Times are Unix milliseconds. SQLite has one writer at a time, so a
-- single UPDATE ... RETURNING claims atomically.

-- name: create_table
CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_version INTEGER NOT NULL,
    service_name TEXT NOT NULL,
    topic TEXT NOT NULL,
    message_key TEXT,
    aggregate_id TEXT,
    payload TEXT NOT NULL,
    headers TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    next_attempt_at INTEGER,
    lease_owner TEXT,
    lease_until INTEGER,
    last_error TEXT,
    dead_reason TEXT,
    published_at INTEGER,
    consumed_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
)

-- name: index_event_id
CREATE UNIQUE INDEX IF NOT EXISTS {table}_eid ON {table} (event_id)

-- name: index_due
CREATE INDEX IF NOT EXISTS {table}_due ON {table} (next_attempt_at, id) WHERE status = 'pending'

-- name: index_lease
CREATE INDEX IF NOT EXISTS {table}_lease ON {table} (lease_until) WHERE status = 'sending'

-- name: index_open
-- Claims walk the open rows in id order (see the PostgreSQL query).
CREATE INDEX IF NOT EXISTS {table}_open ON {table} (id) WHERE status IN ('pending', 'sending')

-- name: index_key
CREATE INDEX IF NOT EXISTS {table}_key ON {table} (message_key, id) WHERE status IN ('pending', 'sending')

-- name: index_status
CREATE INDEX IF NOT EXISTS {table}_st ON {table} (status, updated_at)

-- name: create_inbox
CREATE TABLE IF NOT EXISTS outbox_inbox (
    consumer_group TEXT NOT NULL,
    event_id TEXT NOT NULL,
    consumed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
)

-- name: insert
-- event_id, event_type, event_version, service_name, topic, message_key, aggregate_id, payload,
-- headers, max_attempts, next_attempt_at, created_at, updated_at
INSERT INTO {table} (event_id, event_type, event_version, service_name, topic, message_key,
    aggregate_id, payload, headers, status, attempts, max_attempts, next_attempt_at,
    created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)
RETURNING id

-- name: expire_leases
-- updated_at, now
UPDATE {table}
SET status = 'dead', dead_reason = 'lease_expired',
    last_error = 'the lease expired on the last allowed attempt; the publisher holding it stopped',
    lease_owner = NULL, lease_until = NULL, next_attempt_at = NULL, updated_at = ?
WHERE status = 'sending' AND lease_until <= ? AND attempts >= max_attempts

-- name: claim
-- lease_owner, lease_until, updated_at, now (pending due), now (lease expired), limit
UPDATE {table}
SET status = 'sending', lease_owner = ?, lease_until = ?, attempts = attempts + 1,
    updated_at = ?
WHERE id IN (
    SELECT c.id FROM {table} c
    WHERE c.status IN ('pending', 'sending')
      AND ((c.status = 'pending' AND c.next_attempt_at <= ?)
        OR (c.status = 'sending' AND c.lease_until <= ? AND c.attempts < c.max_attempts))
      AND (c.message_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM {table} e
            WHERE e.message_key = c.message_key AND e.id < c.id
              AND e.status IN ('pending', 'sending')))
    ORDER BY c.id
    LIMIT ?)
RETURNING {columns}

-- name: mark_published
-- published_at, updated_at, lease_owner, ids...
UPDATE {table}
SET status = 'published', published_at = ?, updated_at = ?, lease_owner = NULL,
    lease_until = NULL, next_attempt_at = NULL, last_error = NULL
WHERE status = 'sending' AND lease_owner = ? AND id IN ({ids})

-- name: get_for_update
-- event_id
SELECT {columns} FROM {table} WHERE event_id = ?

-- name: get_many_for_update
-- A consumer's batch (the write transaction holds the database lock).
-- event_ids...
SELECT {columns} FROM {table} WHERE event_id IN ({ids}) ORDER BY id

-- name: create_inbox_at
CREATE INDEX IF NOT EXISTS {table}_at ON {table} (consumed_at)

-- name: purge_inbox
-- consumed_at before, limit
DELETE FROM {table} WHERE rowid IN (
    SELECT rowid FROM {table} WHERE consumed_at < ? LIMIT ?)

-- name: inbox_insert
-- consumer_group, event_id, consumed_at
INSERT INTO outbox_inbox (consumer_group, event_id, consumed_at) VALUES (?, ?, ?)
ON CONFLICT DO NOTHING

-- name: purge_consumed
-- consumed_at before, limit
DELETE FROM {table} WHERE id IN (
    SELECT id FROM {table} WHERE status = 'consumed' AND consumed_at < ? ORDER BY id LIMIT ?)
