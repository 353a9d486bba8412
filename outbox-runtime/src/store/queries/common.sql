-- Queries shared by every dialect, written with PostgreSQL's `$n` placeholders; the MySQL and
-- SQLite stores turn each `$n` into `?`, which is why each parameter appears once and in
-- binding order. `{ids}` becomes a list of placeholders numbered on from the last one.
-- Every status change is a compare-and-set on the status it expects.

-- name: retry_leased
-- next_attempt_at, last_error, updated_at, id, lease_owner
UPDATE {table}
SET status = 'pending', next_attempt_at = $1, last_error = $2, lease_owner = NULL,
    lease_until = NULL, updated_at = $3
WHERE id = $4 AND status = 'sending' AND lease_owner = $5

-- name: dead_leased
-- dead_reason, last_error, updated_at, id, lease_owner
UPDATE {table}
SET status = 'dead', dead_reason = $1, last_error = $2, next_attempt_at = NULL,
    lease_owner = NULL, lease_until = NULL, updated_at = $3
WHERE id = $4 AND status = 'sending' AND lease_owner = $5

-- name: release_leased
-- Rows claimed behind an earlier row of their key that failed to publish: never sent, so back
-- to pending, due at once, with the attempt their claim counted taken back. The failed row,
-- first of the key and waiting for its retry, holds them back until it is published or dead.
-- The status is checked in a CASE, so that the rows are read by primary key and not through a
-- partial index on the status (see `claim_lock` in postgres.sql).
-- next_attempt_at, updated_at, lease_owner, ids...
UPDATE {table}
SET status = 'pending', attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
    next_attempt_at = $1, lease_owner = NULL, lease_until = NULL, updated_at = $2
WHERE CASE WHEN status = 'sending' THEN lease_owner = $3 ELSE FALSE END AND id IN ({ids})

-- name: retry_open
-- next_attempt_at, last_error, updated_at, id
UPDATE {table}
SET status = 'pending', next_attempt_at = $1, last_error = $2, lease_owner = NULL,
    lease_until = NULL, updated_at = $3
WHERE id = $4 AND status IN ('pending', 'sending', 'published')

-- name: dead_open
-- dead_reason, last_error, updated_at, id
UPDATE {table}
SET status = 'dead', dead_reason = $1, last_error = $2, next_attempt_at = NULL,
    lease_owner = NULL, lease_until = NULL, updated_at = $3
WHERE id = $4 AND status IN ('pending', 'sending', 'published')

-- name: mark_many_consumed
-- A consumer's batch (or one row) consumed. A row that went dead because its lease ran out on
-- the last attempt may still have been published; when its message arrives it is applied like
-- any open row.
-- consumed_at, updated_at, ids...
UPDATE {table}
SET status = 'consumed', consumed_at = $1, updated_at = $2, lease_owner = NULL,
    lease_until = NULL, next_attempt_at = NULL, dead_reason = NULL
WHERE id IN ({ids}) AND (status IN ('pending', 'sending', 'published')
    OR (status = 'dead' AND dead_reason = 'lease_expired'))

-- name: replay
-- next_attempt_at, updated_at, ids...
UPDATE {table}
SET status = 'pending', attempts = 0, next_attempt_at = $1, last_error = NULL,
    dead_reason = NULL, updated_at = $2
WHERE status = 'dead' AND id IN ({ids})

-- name: discard
-- ids...
DELETE FROM {table} WHERE status = 'dead' AND id IN ({ids})

-- name: get
-- id
SELECT {columns} FROM {table} WHERE id = $1

-- name: get_by_event_id
-- event_id
SELECT {columns} FROM {table} WHERE event_id = $1

-- name: list_dead
-- after id, limit
SELECT {columns} FROM {table} WHERE status = 'dead' AND id > $1 ORDER BY id LIMIT $2

-- name: count_by_status
SELECT status, COUNT(*) FROM {table} GROUP BY status

-- name: oldest_due
-- now
SELECT MIN(next_attempt_at) FROM {table} WHERE status = 'pending' AND next_attempt_at <= $1

-- name: oldest_published
-- A published row's updated_at is when it was published (nothing else changes a published
-- row), and the status index covers it.
SELECT MIN(updated_at) FROM {table} WHERE status = 'published'

-- name: stuck_published
-- Rows published before a time (their message never reached a consumer, or no consumer marks
-- rows: see `republish`), oldest first.
-- before, limit
SELECT id FROM {table} WHERE status = 'published' AND updated_at < $1 ORDER BY id LIMIT $2

-- name: republish
-- Published rows back to pending, due at once, attempts reset as by `replay`: a compare-and-set
-- on the status and the age that chose them, in a CASE, so that the rows are read by primary
-- key and not through every published row of the age (the published index).
-- next_attempt_at, updated_at, before, ids...
UPDATE {table}
SET status = 'pending', attempts = 0, next_attempt_at = $1, published_at = NULL,
    lease_owner = NULL, lease_until = NULL, updated_at = $2
WHERE CASE WHEN status = 'published' THEN updated_at < $3 ELSE FALSE END AND id IN ({ids})

-- name: dead_by_reason
SELECT COALESCE(dead_reason, 'unknown'), COUNT(*) FROM {table} WHERE status = 'dead'
GROUP BY COALESCE(dead_reason, 'unknown')

-- name: inbox_dead_insert
-- consumer_group, event_id, event_type, event_version, topic, reason, last_error, attempts,
-- envelope, dead_at, message_key
INSERT INTO outbox_inbox_dead (consumer_group, event_id, event_type, event_version, topic,
    reason, last_error, attempts, envelope, dead_at, message_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)

-- name: inbox_dead_list
-- consumer_group, after event_id, limit
SELECT consumer_group, event_id, event_type, event_version, topic, reason, last_error,
    attempts, envelope, dead_at, message_key
FROM outbox_inbox_dead WHERE consumer_group = $1 AND event_id > $2 ORDER BY event_id LIMIT $3

-- name: inbox_dead_get
-- consumer_group, event_id
SELECT consumer_group, event_id, event_type, event_version, topic, reason, last_error,
    attempts, envelope, dead_at, message_key
FROM outbox_inbox_dead WHERE consumer_group = $1 AND event_id = $2

-- name: inbox_dead_delete
-- consumer_group, event_id
DELETE FROM outbox_inbox_dead WHERE consumer_group = $1 AND event_id = $2

-- name: inbox_forget
-- consumer_group, event_id
DELETE FROM outbox_inbox WHERE consumer_group = $1 AND event_id = $2

-- name: inbox_retry_again
-- A kept message of an inbox consumer that failed again.
-- attempts, next_attempt_at, last_error, consumer_group, event_id
UPDATE outbox_inbox_retry SET attempts = $1, next_attempt_at = $2, last_error = $3
WHERE consumer_group = $4 AND event_id = $5

-- name: inbox_retry_insert
-- consumer_group, event_id, topic, message_key, envelope, traceparent, attempts,
-- next_attempt_at, last_error
INSERT INTO outbox_inbox_retry (consumer_group, event_id, topic, message_key, envelope,
    traceparent, attempts, next_attempt_at, last_error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)

-- name: inbox_retry_get
-- consumer_group, event_id
SELECT consumer_group, event_id, topic, message_key, envelope, traceparent, attempts,
    next_attempt_at, last_error
FROM outbox_inbox_retry WHERE consumer_group = $1 AND event_id = $2

-- name: inbox_retry_due
-- consumer_group, now, limit
SELECT consumer_group, event_id, topic, message_key, envelope, traceparent, attempts,
    next_attempt_at, last_error
FROM outbox_inbox_retry WHERE consumer_group = $1 AND next_attempt_at <= $2
ORDER BY next_attempt_at LIMIT $3

-- name: inbox_retry_take
-- A due retry, leased to whoever takes it first: a compare-and-set on the time it was read
-- with.
-- lease end, consumer_group, event_id, next_attempt_at as read
UPDATE outbox_inbox_retry SET next_attempt_at = $1
WHERE consumer_group = $2 AND event_id = $3 AND next_attempt_at = $4

-- name: inbox_retry_next
-- consumer_group
SELECT MIN(next_attempt_at) FROM outbox_inbox_retry WHERE consumer_group = $1

-- name: inbox_retry_delete
-- consumer_group, event_id
DELETE FROM outbox_inbox_retry WHERE consumer_group = $1 AND event_id = $2
