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
    room VARCHAR(64) NULL DEFAULT '........................................',
    UNIQUE KEY {table}_eid (event_id),
    KEY {table}_open (status, id),
    KEY {table}_st (status, updated_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci

-- A service table made before 2026-12-07 has three more indexes, each written by every insert
-- and every change of a row's status (four per event) and read by no query the relay or the
-- consumers run: `{table}_due` (claims read the due time from the rows they find through
-- `{table}_open`; only `outbox status`'s oldest due row read it), `{table}_lease` (expired
-- leases are found among the few sending rows through `{table}_open`) and `{table}_key` (read by
-- nothing). Without them a backlog of 100,000 rows drained about a quarter faster (the bench's
-- `relay_backlog` on MariaDB: 17,300–18,100 rows/s against 13,900–15,500). `migrate` drops each
-- that is there: `table_upgrade_check_X` counts it, `table_upgrade_X` drops it (MySQL 8 has no
-- `DROP INDEX IF EXISTS`).

-- `room` holds the bytes a row grows by later in its life, given up by the change that grows it
-- (the claim: the lease's owner and end; the consumer's mark: the time consumed). InnoDB rewrites
-- a row in place only at the same size; a smaller one takes the old one's space in its page, but
-- a larger one takes new space, and a page that runs out is reorganized or split, which
-- MariaDB logs as whole pages. Rows inserted in id order fill their pages, so without the room
-- each claim grew its rows out of their pages: 3.3 KB of redo per claimed row and 2.6 KB per
-- consumed one, against 0.5 KB with it. The claim gives up the owner's length and 9 bytes (the
-- lease end's 8 and a length byte) once, when the row had no lease; the consumer's mark 8. A
-- table made before 2026-12-07 has no `room`: `migrate` adds it (in place, without copying the
-- table: the column is last and has a default, which the rows already there read as theirs).

-- name: table_upgrade_check_room
SELECT 1 - COUNT(*) FROM information_schema.columns
WHERE table_schema = DATABASE() AND table_name = '{table}' AND column_name = 'room'

-- name: table_upgrade_room
ALTER TABLE {table} ADD COLUMN room VARCHAR(64) NULL DEFAULT '........................................'

-- name: table_upgrade_check_due
SELECT COUNT(*) FROM information_schema.statistics
WHERE table_schema = DATABASE() AND table_name = '{table}' AND index_name = '{table}_due'

-- name: table_upgrade_due
ALTER TABLE {table} DROP INDEX {table}_due

-- name: table_upgrade_check_lease
SELECT COUNT(*) FROM information_schema.statistics
WHERE table_schema = DATABASE() AND table_name = '{table}' AND index_name = '{table}_lease'

-- name: table_upgrade_lease
ALTER TABLE {table} DROP INDEX {table}_lease

-- name: table_upgrade_check_key
SELECT COUNT(*) FROM information_schema.statistics
WHERE table_schema = DATABASE() AND table_name = '{table}' AND index_name = '{table}_key'

-- name: table_upgrade_key
ALTER TABLE {table} DROP INDEX {table}_key

-- name: create_inbox_dead
-- What a consumer with its own database must not (or could not) apply: the whole message as it
-- arrived, with the reason, kept in that database.
CREATE TABLE IF NOT EXISTS outbox_inbox_dead (
    consumer_group VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
    event_id VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
    event_type VARCHAR(255) NOT NULL,
    event_version INT NOT NULL,
    message_key VARCHAR(255),
    topic VARCHAR(255) NOT NULL,
    reason VARCHAR(64) NOT NULL,
    last_error TEXT NOT NULL,
    attempts INT NOT NULL,
    envelope LONGTEXT NOT NULL,
    dead_at BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci

-- name: create_inbox_retry
-- Messages an inbox consumer failed to apply, to try again when due: the whole message as it
-- arrived, so that its partition moves on meanwhile.
CREATE TABLE IF NOT EXISTS outbox_inbox_retry (
    consumer_group VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
    event_id VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
    topic VARCHAR(255) NOT NULL,
    message_key VARCHAR(255),
    envelope LONGTEXT NOT NULL,
    traceparent VARCHAR(255),
    attempts INT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    PRIMARY KEY (consumer_group, event_id),
    KEY outbox_inbox_retry_due (consumer_group, next_attempt_at)
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
-- rows by primary key, re-checking the condition. The sending rows are read through
-- `{table}_open`: with statistics taken while the table was small, the optimizer read the whole
-- table instead.
-- now
SELECT id FROM {table} FORCE INDEX ({table}_open)
WHERE status = 'sending' AND lease_until <= ? AND attempts >= max_attempts

-- name: expire_leases
-- The rows `expire_lock` locked, by primary key alone (see `mark_published`).
-- updated_at, id ranges...
UPDATE {table} FORCE INDEX (PRIMARY)
SET status = 'dead', dead_reason = 'lease_expired',
    last_error = 'the lease expired on the last allowed attempt; the publisher holding it stopped',
    lease_owner = NULL, lease_until = NULL, next_attempt_at = NULL, updated_at = ?
WHERE {id_ranges}

-- name: claim_window
-- The first open rows in id order after `after`, each with whether it can be claimed now (due,
-- or leased until a time now past with attempts left). A key's first open row is its oldest,
-- so the store sees in one ordered read which keys may go and how many of their rows in a row.
-- Each status is read in id order from its own index, so the read never walks published rows.
-- now, after, limit, now, after, limit, limit
SELECT id, message_key, ok FROM (
    SELECT * FROM (
        SELECT id, message_key,
            CASE WHEN next_attempt_at <= $1 THEN CAST(1 AS SIGNED) ELSE CAST(0 AS SIGNED) END
                AS ok
        FROM {table} FORCE INDEX ({table}_open)
        WHERE status = 'pending' AND id > $2 ORDER BY id LIMIT $3) p
    UNION ALL
    SELECT * FROM (
        SELECT id, message_key,
            CASE WHEN lease_until <= $4 AND attempts < max_attempts
                THEN CAST(1 AS SIGNED) ELSE CAST(0 AS SIGNED) END AS ok
        FROM {table} FORCE INDEX ({table}_open)
        WHERE status = 'sending' AND id > $5 ORDER BY id LIMIT $6) s
) AS w
ORDER BY id
LIMIT $7

-- name: mark_published_lock
-- Rows a consumer holds locked are skipped, not waited for (see the PostgreSQL query). Read
-- through the primary key alone, where a range of a secondary index (the optimizer's choice
-- otherwise) would lock gaps that writers insert into, and deadlock with their transactions.
--
-- `{id_ranges}`, here and in the relay's other statements over rows it chose (`claim_lock`,
-- `claim_update`, `select_ids`, `mark_published`, `expire_lock`, `expire_leases`), is one
-- `id BETWEEN ? AND ?` per run of consecutive ids: each value of an `IN` list descends the
-- primary key from its root, a run read as a range descends once (in a replay, lists read 13
-- pages per row at 10,000 rows and 20 at 100,000, a level deeper; ranges 9 at both). The
-- transactions that run them are `READ COMMITTED` (`begin_relay` in `mysql.rs`), where a
-- range locks the rows it keeps and no other row or gap; on a server that refuses that level,
-- and inside a transaction the caller holds (a savepoint, at the caller's level), the relay
-- reads lists of the ids instead (`id IN (...)`: point lookups lock no gap at any level). The
-- updates are forced onto the primary key too: on a small table the optimizer chose to scan
-- it, which at `REPEATABLE READ` locks every row and the gap at its end.
-- lease_owner, id ranges...
SELECT id FROM {table} FORCE INDEX (PRIMARY)
WHERE status = 'sending' AND lease_owner = ? AND {id_ranges}
FOR UPDATE SKIP LOCKED

-- name: mark_published
-- The rows `mark_published_lock` locked (still sending under the owner's lease: no one can
-- change them before this transaction ends), by primary key alone.
-- published_at, updated_at, id ranges...
UPDATE {table} FORCE INDEX (PRIMARY)
SET status = 'published', published_at = ?, updated_at = ?, lease_owner = NULL,
    lease_until = NULL, next_attempt_at = NULL, last_error = NULL
WHERE {id_ranges}

-- name: expire_lock
-- now, id ranges...
SELECT id FROM {table} FORCE INDEX (PRIMARY)
WHERE status = 'sending' AND lease_until <= ? AND attempts >= max_attempts AND {id_ranges}
FOR UPDATE SKIP LOCKED

-- name: count_open
-- `Outbox::backlog`: each open status counted through the `(status, id)` index.
SELECT CAST((SELECT COUNT(*) FROM {table} FORCE INDEX ({table}_open) WHERE status = 'pending')
    + (SELECT COUNT(*) FROM {table} FORCE INDEX ({table}_open) WHERE status = 'sending') AS SIGNED)

-- name: get_for_update
-- Through the event id's index alone, as `get_many_for_update`.
-- event_id
SELECT {columns} FROM {table} FORCE INDEX ({table}_eid) WHERE event_id = ? FOR UPDATE

-- name: get_many_for_update
-- A consumer's batch: locked in id order, so two batches never wait on each other in a cycle.
-- Through the event id's index alone: with statistics taken while the table was small (a new
-- table, or writers outpacing InnoDB's recalculation), the optimizer read the primary key in
-- order instead, to spare the sort, and locked every row it passed (255 index reads per event
-- and lock waits on the relay's rows in the bench's `e2e`, which ran at 35% of `raw_insert`
-- with 1.7 s latency).
-- event_ids...
SELECT {columns} FROM {table} FORCE INDEX ({table}_eid) WHERE event_id IN ({ids}) ORDER BY id
FOR UPDATE

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

-- name: purge_published
-- Retention where consumers use the inbox (rows end at published): published before, limit
DELETE FROM {table} WHERE status = 'published' AND updated_at < ? ORDER BY id LIMIT ?

-- name: purge_consumed
-- consumed_at before, limit
DELETE FROM {table} WHERE status = 'consumed' AND consumed_at < ? ORDER BY id LIMIT ?

-- name: claim_lock
-- The planned rows that are still claimable, locked, skipping rows another transaction holds.
-- A row another claimer took meanwhile fails the re-check (or is skipped while locked); the
-- store then drops it and every later planned row of its key.
-- now (pending due), now (lease expired), id ranges...
SELECT id FROM {table} FORCE INDEX (PRIMARY)
WHERE ((status = 'pending' AND next_attempt_at <= $1)
    OR (status = 'sending' AND lease_until <= $2 AND attempts < max_attempts))
  AND {id_ranges}
ORDER BY id
FOR UPDATE SKIP LOCKED
-- name: claim_update
-- The rows the claim keeps, locked by it: leased to the owner, one attempt more. The row gives
-- up as much `room` as the lease takes (see `table_upgrade_check_room`): MySQL assigns in
-- order, so `room` sees the new owner and the old lease end. (With MariaDB's
-- SIMULTANEOUS_ASSIGNMENT mode it sees the old owner, NULL, and gives up all its room: the row
-- still does not grow.)
-- lease_owner, lease_until, updated_at, id ranges...
UPDATE {table} FORCE INDEX (PRIMARY)
SET status = 'sending', lease_owner = $1,
    room = CASE WHEN lease_until IS NULL
        THEN LEFT(room, GREATEST(0, CHAR_LENGTH(room) - CHAR_LENGTH(lease_owner) - 9))
        ELSE room END,
    lease_until = $2, attempts = attempts + 1, updated_at = $3
WHERE {id_ranges}

-- name: mark_many_consumed
-- As in common.sql, and the row gives up the `room` its consumed time takes.
-- consumed_at, updated_at, ids...
UPDATE {table}
SET status = 'consumed',
    room = CASE WHEN consumed_at IS NULL THEN LEFT(room, GREATEST(0, CHAR_LENGTH(room) - 8))
        ELSE room END,
    consumed_at = $1, updated_at = $2, lease_owner = NULL, lease_until = NULL,
    next_attempt_at = NULL, dead_reason = NULL
WHERE id IN ({ids}) AND (status IN ('pending', 'sending', 'published')
    OR (status = 'dead' AND dead_reason = 'lease_expired'))

-- name: select_ids
-- The rows a claim took, as its update left them: id ranges...
SELECT {columns} FROM {table} WHERE {id_ranges} ORDER BY id

-- name: inbox_dead_list
-- The keys compare byte for byte (utf8mb4_bin); read back as text.
-- consumer_group, after event_id, limit
SELECT CAST(consumer_group AS CHAR), CAST(event_id AS CHAR), event_type, event_version, topic,
    reason, last_error, attempts, envelope, dead_at, message_key
FROM outbox_inbox_dead WHERE consumer_group = ? AND event_id > ? ORDER BY event_id LIMIT ?

-- name: inbox_retry_get
-- The keys compare byte for byte (utf8mb4_bin); read back as text.
-- consumer_group, event_id
SELECT CAST(consumer_group AS CHAR), CAST(event_id AS CHAR), topic, message_key, envelope,
    traceparent, attempts, next_attempt_at, last_error
FROM outbox_inbox_retry WHERE consumer_group = ? AND event_id = ?

-- name: inbox_retry_due
-- consumer_group, now, limit
SELECT CAST(consumer_group AS CHAR), CAST(event_id AS CHAR), topic, message_key, envelope,
    traceparent, attempts, next_attempt_at, last_error
FROM outbox_inbox_retry WHERE consumer_group = ? AND next_attempt_at <= ?
ORDER BY next_attempt_at LIMIT ?

-- name: inbox_dead_get
-- consumer_group, event_id
SELECT CAST(consumer_group AS CHAR), CAST(event_id AS CHAR), event_type, event_version, topic,
    reason, last_error, attempts, envelope, dead_at, message_key
FROM outbox_inbox_dead WHERE consumer_group = ? AND event_id = ?

-- name: create_calls
-- Handlers that run outside a transaction: a claimed call (its lease) per consumer group and
-- event, from the claim until the event is marked done.
CREATE TABLE IF NOT EXISTS outbox_calls (
    consumer_group VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
    event_id VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
    lease_owner VARCHAR(255) NOT NULL,
    lease_until BIGINT NOT NULL,
    attempts INT NOT NULL,
    last_error TEXT,
    PRIMARY KEY (consumer_group, event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci

-- name: call_insert
-- consumer_group, event_id, lease_owner, lease_until
INSERT IGNORE INTO outbox_calls (consumer_group, event_id, lease_owner, lease_until, attempts)
VALUES (?, ?, ?, ?, 1)

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
SELECT CAST(column_name AS CHAR),
    CASE WHEN is_nullable = 'NO' AND column_default IS NULL AND extra NOT LIKE '%auto_increment%'
        THEN 1 ELSE 0 END
FROM information_schema.columns
WHERE table_schema = DATABASE() AND table_name = '{table}'

-- The Go system's tables (spec §1): only MySQL has these queries. {table} is the Go table.

-- name: go_insert
-- A Go row (`CreateMessage`): biz_type, service_name, topic, message_key, payload (the shell),
-- max_retry; due at once.
INSERT INTO {table} (biz_type, service_name, topic, message_key, payload, status, retry_count,
    max_retry, next_retry_at, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, NOW(), NOW(), NOW())

-- name: go_lock
SELECT CAST(status AS CHAR), CAST(retry_count AS SIGNED) FROM {table} WHERE id = ? FOR UPDATE

-- name: go_status
SELECT CAST(status AS CHAR), CAST(retry_count AS SIGNED) FROM {table} WHERE id = ?

-- name: go_consumed
UPDATE {table} SET status = 'consumed', consumed_at = NOW(), last_error = NULL,
    next_retry_at = NULL, updated_at = NOW()
WHERE id = ? AND status NOT IN ('consumed', 'dead', 'moved')

-- name: go_dead
UPDATE {table} SET status = 'dead', last_error = ?, next_retry_at = NULL, updated_at = NOW()
WHERE id = ? AND status NOT IN ('consumed', 'dead', 'moved')

-- name: go_retry
-- `MarkFailedForRetry`: n = retry_count + 1; dead at max_retry, else pending after min(n, 10)²
-- seconds. MySQL assigns left to right, so retry_count is raised last.
UPDATE {table} SET
    status = CASE WHEN retry_count + 1 >= max_retry THEN 'dead' ELSE 'pending' END,
    next_retry_at = CASE WHEN retry_count + 1 >= max_retry THEN NULL
        ELSE DATE_ADD(NOW(), INTERVAL LEAST(retry_count + 1, 10) * LEAST(retry_count + 1, 10) SECOND)
    END,
    last_error = ?, updated_at = NOW(), retry_count = retry_count + 1
WHERE id = ? AND status NOT IN ('consumed', 'dead', 'moved')

-- name: go_due
-- Pending rows after an id, oldest first, for `outbox import-go`: id, service_name,
-- message_key, payload.
SELECT id, CAST(service_name AS CHAR), CAST(message_key AS CHAR), CAST(payload AS CHAR)
FROM {table} WHERE status = 'pending' AND id > ? ORDER BY id LIMIT ?

-- name: go_take
-- A pending row moved into this outbox: a compare-and-set, so that a row moves once.
UPDATE {table} SET status = 'moved', last_error = ?, next_retry_at = NULL, updated_at = NOW()
WHERE id = ? AND status = 'pending'

-- name: go_counts
SELECT CAST(status AS CHAR), COUNT(*) FROM {table} GROUP BY status ORDER BY 1
