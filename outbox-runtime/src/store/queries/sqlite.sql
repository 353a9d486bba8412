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
-- Tables made before 2026-12-07 had an index on the due time of pending rows, which every insert
-- wrote: claims read the due time from the rows they find in id order (`index_pending`), and
-- only `outbox status`'s oldest due row, which counts the whole table anyway, read it. Without
-- it and `index_lease`, 100,000 rows were inserted in 7–22% less time on PostgreSQL.
DROP INDEX IF EXISTS {table}_due

-- name: index_lease
-- Tables made before 2026-12-07 had an index on the lease of sending rows, which every claim
-- wrote: expired leases are found among the few sending rows through `index_sending`.
DROP INDEX IF EXISTS {table}_lease

-- name: index_key
-- Tables made before 2026-12-06 had an index on keys that no query reads.
DROP INDEX IF EXISTS {table}_key

-- name: index_open
-- Tables made before 2026-12-06 had one index over both open statuses, which SQLite never
-- used: it takes a partial index only for a query that names the index's own condition. A
-- claim read every pending row through the status index and sorted them, so a backlog of
-- 100,000 rows on one key drained in 13x the time of 10,000.
DROP INDEX IF EXISTS {table}_open

-- name: index_pending
-- Claims read each open status in id order from its own index, whose condition is the query's.
CREATE INDEX IF NOT EXISTS {table}_pending ON {table} (id) WHERE status = 'pending'

-- name: index_sending
CREATE INDEX IF NOT EXISTS {table}_sending ON {table} (id) WHERE status = 'sending'

-- name: index_status
-- Tables made before 2026-12-06 had one index on (status, updated_at) over every row, which
-- each change of a row's status wrote (four times per event) for queries that read only
-- published, consumed or dead rows; each of those has a partial index of its own now. The
-- claims and marks of a 100,000-row drain, replayed alone on PostgreSQL, took 70% of the time
-- without it.
DROP INDEX IF EXISTS {table}_st

-- name: index_published
-- Stuck rows and retention (published before a time), and their age.
CREATE INDEX IF NOT EXISTS {table}_published ON {table} (updated_at) WHERE status = 'published'

-- name: index_consumed
-- Retention where consumers mark rows consumed.
CREATE INDEX IF NOT EXISTS {table}_consumed ON {table} (consumed_at) WHERE status = 'consumed'

-- name: index_dead
-- The dead letters, listed in id order, and their reasons.
CREATE INDEX IF NOT EXISTS {table}_dead ON {table} (id) WHERE status = 'dead'

-- name: create_inbox_dead
-- What a consumer with its own database must not (or could not) apply: the whole message as it
-- arrived, with the reason, kept in that database.
CREATE TABLE IF NOT EXISTS outbox_inbox_dead (
    consumer_group TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_version INTEGER NOT NULL,
    message_key TEXT,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    last_error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    envelope TEXT NOT NULL,
    dead_at INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
)

-- name: create_inbox_retry
-- Messages an inbox consumer failed to apply, to try again when due: the whole message as it
-- arrived, so that its partition moves on meanwhile.
CREATE TABLE IF NOT EXISTS outbox_inbox_retry (
    consumer_group TEXT NOT NULL,
    event_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    message_key TEXT,
    envelope TEXT NOT NULL,
    traceparent TEXT,
    attempts INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
)

-- name: create_inbox_retry_due
CREATE INDEX IF NOT EXISTS outbox_inbox_retry_due ON outbox_inbox_retry (consumer_group, next_attempt_at)

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
UPDATE {table} INDEXED BY {table}_sending
SET status = 'dead', dead_reason = 'lease_expired',
    last_error = 'the lease expired on the last allowed attempt; the publisher holding it stopped',
    lease_owner = NULL, lease_until = NULL, next_attempt_at = NULL, updated_at = ?
WHERE status = 'sending' AND lease_until <= ? AND attempts >= max_attempts

-- name: claim_window
-- The first open rows in id order after `after`, each with whether it can be claimed now (due,
-- or leased until a time now past with attempts left). A key's first open row is its oldest,
-- so the store sees in one ordered read which keys may go and how many of their rows in a row.
-- Each status is read in id order from its own index, so the read never walks published rows;
-- named, because without statistics SQLite prefers the status index and sorts every open row.
-- now, after, limit, now, after, limit, limit
SELECT id, message_key, ok FROM (
    SELECT * FROM (
        SELECT id, message_key,
            CASE WHEN next_attempt_at <= $1 THEN 1 ELSE 0 END AS ok
        FROM {table} INDEXED BY {table}_pending
        WHERE status = 'pending' AND id > $2 ORDER BY id LIMIT $3) p
    UNION ALL
    SELECT * FROM (
        SELECT id, message_key,
            CASE WHEN lease_until <= $4 AND attempts < max_attempts
                THEN 1 ELSE 0 END AS ok
        FROM {table} INDEXED BY {table}_sending
        WHERE status = 'sending' AND id > $5 ORDER BY id LIMIT $6) s
) AS w
ORDER BY id
LIMIT $7

-- name: claim_lock
-- The planned rows that are still claimable (SQLite has one writer at a time, so the plan
-- holds; the re-check keeps one claim procedure for every database).
-- now (pending due), now (lease expired), ids...
SELECT id FROM {table}
WHERE ((status = 'pending' AND next_attempt_at <= $1)
    OR (status = 'sending' AND lease_until <= $2 AND attempts < max_attempts))
  AND id IN ({ids})
ORDER BY id

-- name: claim_update
-- The rows the claim keeps, locked by it: leased to the owner, one attempt more.
-- lease_owner, lease_until, updated_at, ids...
UPDATE {table}
SET status = 'sending', lease_owner = $1, lease_until = $2, attempts = attempts + 1,
    updated_at = $3
WHERE id IN ({ids})
RETURNING {columns}

-- name: mark_published
-- published_at, updated_at, lease_owner, ids...
UPDATE {table}
SET status = 'published', published_at = ?, updated_at = ?, lease_owner = NULL,
    lease_until = NULL, next_attempt_at = NULL, last_error = NULL
WHERE status = 'sending' AND lease_owner = ? AND id IN ({ids})

-- name: count_open
-- `Outbox::backlog`: each open status counted through its partial index, named (SQLite takes
-- a partial index only for a query that names its condition).
SELECT (SELECT COUNT(*) FROM {table} INDEXED BY {table}_pending WHERE status = 'pending')
    + (SELECT COUNT(*) FROM {table} INDEXED BY {table}_sending WHERE status = 'sending')

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

-- name: inbox_insert_many
-- A batch's events at once, `{values}` rows of (consumer_group, event_id, consumed_at); the
-- ones it inserted come back (those already there were applied before).
INSERT INTO outbox_inbox (consumer_group, event_id, consumed_at) VALUES {values}
ON CONFLICT DO NOTHING RETURNING event_id, 0

-- name: inbox_forget_many
-- consumer_group, event ids
DELETE FROM outbox_inbox WHERE consumer_group = ? AND event_id IN ({ids})

-- name: inbox_insert
-- consumer_group, event_id, consumed_at
INSERT INTO outbox_inbox (consumer_group, event_id, consumed_at) VALUES (?, ?, ?)
ON CONFLICT DO NOTHING

-- name: purge_published
-- Retention where consumers use the inbox (rows end at published): published before, limit
DELETE FROM {table} WHERE id IN (
    SELECT id FROM {table} WHERE status = 'published' AND updated_at < ? ORDER BY id LIMIT ?)

-- name: purge_consumed
-- consumed_at before, limit
DELETE FROM {table} WHERE id IN (
    SELECT id FROM {table} WHERE status = 'consumed' AND consumed_at < ? ORDER BY id LIMIT ?)

-- name: create_calls
-- Handlers that run outside a transaction: a claimed call (its lease) per consumer group and
-- event, from the claim until the event is marked done.
CREATE TABLE IF NOT EXISTS outbox_calls (
    consumer_group VARCHAR(255) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    lease_owner VARCHAR(255) NOT NULL,
    lease_until BIGINT NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    PRIMARY KEY (consumer_group, event_id)
)

-- name: call_insert
-- consumer_group, event_id, lease_owner, lease_until
INSERT INTO outbox_calls (consumer_group, event_id, lease_owner, lease_until, attempts)
VALUES (?, ?, ?, ?, 1) ON CONFLICT DO NOTHING

-- name: call_take
-- A call whose lease ran out: lease_owner, lease_until, consumer_group, event_id, now
UPDATE outbox_calls SET lease_owner = ?, lease_until = ?, attempts = attempts + 1
WHERE consumer_group = ? AND event_id = ? AND lease_until <= ?

-- name: call_state
-- consumer_group, event_id
SELECT COALESCE(last_error, ''), attempts FROM outbox_calls
WHERE consumer_group = ? AND event_id = ?

-- name: call_holder
-- consumer_group, event_id
SELECT lease_owner, lease_until FROM outbox_calls WHERE consumer_group = ? AND event_id = ?

-- name: call_release
-- A failed call, to be taken again from lease_until: lease_until, last_error, consumer_group,
-- event_id, lease_owner
UPDATE outbox_calls SET lease_until = ?, last_error = ?
WHERE consumer_group = ? AND event_id = ? AND lease_owner = ?

-- name: call_delete
-- consumer_group, event_id
DELETE FROM outbox_calls WHERE consumer_group = ? AND event_id = ?

-- name: table_columns
-- An existing table's columns, each with 1 when an insert must give it a value (NOT NULL, no
-- default): `migrate` and the relay refuse a table that does not fit.
SELECT name, CASE WHEN "notnull" = 1 AND dflt_value IS NULL AND pk = 0 THEN 1 ELSE 0 END
FROM pragma_table_info('{table}')
