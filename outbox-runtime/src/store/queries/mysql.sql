-- Queries for MySQL 8 and MariaDB 10.6 or later. `{table}` is the service's outbox table,
-- checked against [a-z_][a-z0-9_]* before it gets here. Each parameter appears once, in the
-- order the store binds it. Times are Unix milliseconds.

-- name: create_table
CREATE TABLE IF NOT EXISTS {table} (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id CHAR(36) NOT NULL,
    event_type VARCHAR(128) NOT NULL,
    event_version INT NOT NULL,
    service_name VARCHAR(64) NOT NULL,
    topic VARCHAR(249) NOT NULL,
    message_key VARCHAR(255) NULL,
    aggregate_id VARCHAR(255) NULL,
    payload MEDIUMTEXT NOT NULL,
    headers TEXT NOT NULL,
    status VARCHAR(16) NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    max_attempts INT NOT NULL,
    next_attempt_at BIGINT NULL,
    lease_owner VARCHAR(128) NULL,
    lease_until BIGINT NULL,
    last_error TEXT NULL,
    dead_reason VARCHAR(64) NULL,
    published_at BIGINT NULL,
    consumed_at BIGINT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE KEY {table}_eid (event_id),
    KEY {table}_due (status, next_attempt_at, id),
    KEY {table}_open (status, id),
    KEY {table}_lease (status, lease_until),
    KEY {table}_key (message_key, status, id),
    KEY {table}_st (status, updated_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci

-- name: create_inbox
CREATE TABLE IF NOT EXISTS outbox_inbox (
    consumer_group VARCHAR(255) NOT NULL,
    event_id VARCHAR(255) NOT NULL,
    consumed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, event_id),
    KEY {table}_at (consumed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin

-- name: insert
-- event_id, event_type, event_version, service_name, topic, message_key, aggregate_id, payload,
-- headers, max_attempts, next_attempt_at, created_at, updated_at
INSERT INTO {table} (event_id, event_type, event_version, service_name, topic, message_key,
    aggregate_id, payload, headers, status, attempts, max_attempts, next_attempt_at,
    created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)

-- name: expire_candidates
-- A plain read, so that the range scan takes no next-key locks (an UPDATE over the range
-- would deadlock with publishers acknowledging rows in it); `expire_leases` then changes the
-- rows by primary key, re-checking the condition.
-- now
SELECT id FROM {table}
WHERE status = 'sending' AND lease_until <= ? AND attempts >= max_attempts

-- name: expire_leases
-- updated_at, now, ids...
UPDATE {table}
SET status = 'dead', dead_reason = 'lease_expired',
    last_error = 'the lease expired on the last allowed attempt; the publisher holding it stopped',
    lease_owner = NULL, lease_until = NULL, next_attempt_at = NULL, updated_at = ?
WHERE status = 'sending' AND lease_until <= ? AND attempts >= max_attempts AND id IN ({ids})

-- name: claim_candidates
-- A plain (non-locking) read: which rows are due and first of their key. Locking happens in
-- `claim_lock`, so that rows another claimer holds are skipped without hiding an earlier row
-- of the same key from the NOT EXISTS test. Each status is read in id order from the
-- `(status, id)` index, so a claim never walks the published rows (one OR over both statuses
-- sorted every open row; and left to itself MariaDB walks the primary key from the first row,
-- 130 ms a claim behind 300,000 published rows).
-- now (pending due), limit, now (lease expired), limit, limit
SELECT id FROM (
    (SELECT c.id FROM {table} c FORCE INDEX ({table}_open)
    WHERE c.status = 'pending' AND c.next_attempt_at <= ?
      AND (c.message_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM {table} e
            WHERE e.message_key = c.message_key AND e.id < c.id
              AND e.status IN ('pending', 'sending')))
    ORDER BY c.id
    LIMIT ?)
    UNION ALL
    (SELECT c.id FROM {table} c FORCE INDEX ({table}_open)
    WHERE c.status = 'sending' AND c.lease_until <= ? AND c.attempts < c.max_attempts
      AND (c.message_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM {table} e
            WHERE e.message_key = c.message_key AND e.id < c.id
              AND e.status IN ('pending', 'sending')))
    ORDER BY c.id
    LIMIT ?)
) AS due
ORDER BY id
LIMIT ?

-- name: mark_published_lock
-- Rows a consumer holds locked are skipped, not waited for (see the PostgreSQL query).
-- lease_owner, ids...
SELECT id FROM {table}
WHERE status = 'sending' AND lease_owner = ? AND id IN ({ids})
FOR UPDATE SKIP LOCKED

-- name: mark_published
-- published_at, updated_at, lease_owner, ids...
UPDATE {table}
SET status = 'published', published_at = ?, updated_at = ?, lease_owner = NULL,
    lease_until = NULL, next_attempt_at = NULL, last_error = NULL
WHERE status = 'sending' AND lease_owner = ? AND id IN ({ids})

-- name: expire_lock
-- now, ids...
SELECT id FROM {table}
WHERE status = 'sending' AND lease_until <= ? AND attempts >= max_attempts AND id IN ({ids})
FOR UPDATE SKIP LOCKED

-- name: get_for_update
-- event_id
SELECT {columns} FROM {table} WHERE event_id = ? FOR UPDATE

-- name: get_many_for_update
-- A consumer's batch: locked in id order, so two batches never wait on each other in a cycle.
-- event_ids...
SELECT {columns} FROM {table} WHERE event_id IN ({ids}) ORDER BY id FOR UPDATE

-- `upgrade_check_X` counts what an older table lacks; when it is not 0, `migrate` runs
-- `upgrade_X`.

-- name: upgrade_check_inbox_at
-- An inbox table created before retention has no index on consumed_at.
SELECT 1 - COUNT(*) FROM information_schema.statistics
WHERE table_schema = DATABASE() AND table_name = '{table}' AND index_name = '{table}_at'

-- name: upgrade_inbox_at
ALTER TABLE {table} ADD KEY {table}_at (consumed_at)

-- name: purge_inbox
-- consumed_at before, limit
DELETE FROM {table} WHERE consumed_at < ? LIMIT ?

-- name: upgrade_check_inbox_width
-- An inbox table created when event ids were held to 36 characters.
SELECT COUNT(*) FROM information_schema.columns
WHERE table_schema = DATABASE() AND table_name = '{table}' AND column_name = 'event_id'
  AND CHARACTER_MAXIMUM_LENGTH < 255

-- name: upgrade_inbox_width
ALTER TABLE {table} MODIFY event_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL

-- name: inbox_insert
-- consumer_group, event_id, consumed_at
INSERT IGNORE INTO outbox_inbox (consumer_group, event_id, consumed_at) VALUES (?, ?, ?)

-- name: purge_consumed
-- consumed_at before, limit
DELETE FROM {table} WHERE status = 'consumed' AND consumed_at < ? ORDER BY id LIMIT ?

-- name: claim_lock
-- now (pending due), now (lease expired), ids...
SELECT id FROM {table}
WHERE ((status = 'pending' AND next_attempt_at <= ?)
    OR (status = 'sending' AND lease_until <= ? AND attempts < max_attempts))
  AND id IN ({ids})
ORDER BY id
FOR UPDATE SKIP LOCKED

-- name: claim_update
-- lease_owner, lease_until, updated_at, ids...
UPDATE {table}
SET status = 'sending', lease_owner = ?, lease_until = ?, attempts = attempts + 1, updated_at = ?
WHERE id IN ({ids})

-- name: select_ids
-- ids...
SELECT {columns} FROM {table} WHERE id IN ({ids}) ORDER BY id
