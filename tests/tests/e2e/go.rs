//! Beside the Go system, on MariaDB (where its tables are): a Go table made by the Go DDL
//! (spec §1), rows in the Go shell format, and messages byte for byte as the Go relay publishes
//! them (§5.2), no header.

use std::time::{Duration, Instant};

use contracts::{NotificationEvents, samples};
use outbox_runtime::bus::{KafkaBus, KafkaConfig, Outgoing, Publish as _};
use outbox_runtime::consumer::ConsumerConfig;
use outbox_runtime::envelope::VersionFormat;
use outbox_runtime::sqlx::{self, MySql};
use outbox_runtime::store::{GoRoute, StoreConfig};
use outbox_runtime::{Engine, Outbox, Running};

use super::{Recorder, World, brokers, relay};

/// The Go outbox table as GORM's AutoMigrate makes it on MySQL (spec §1.1).
fn go_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (
            id BIGINT NOT NULL AUTO_INCREMENT,
            biz_type VARCHAR(64) NOT NULL,
            service_name VARCHAR(64) NOT NULL DEFAULT '',
            topic VARCHAR(128) NOT NULL,
            message_key VARCHAR(128) NOT NULL,
            payload LONGTEXT NOT NULL,
            status VARCHAR(32) NOT NULL,
            retry_count INT NOT NULL DEFAULT 0,
            max_retry INT NOT NULL DEFAULT 20,
            next_retry_at DATETIME NULL,
            last_error TEXT NULL,
            published_at DATETIME NULL,
            consumed_at DATETIME NULL,
            created_at DATETIME NULL,
            updated_at DATETIME NULL,
            PRIMARY KEY (id),
            KEY idx_outbox_status_next (status, next_retry_at, biz_type),
            KEY idx_outbox_service_name (service_name)
        )"
    )
}

/// A string as Go's `encoding/json` writes it (HTML-safe: `<`, `>`, `&` escaped).
fn go_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Go row as read for the relay.
struct GoRow {
    id: i64,
    service_name: String,
    message_key: String,
    payload: String,
}

/// The Kafka value the Go relay publishes for a row (`dispatchOne`, §4 and §5.2): the shell
/// parsed strictly, the event id defaulting to the decimal row id, the version to `v1`, the
/// aggregate to the message key; the fields in the Go `Envelope` struct's order, empty ones
/// left out, the payload compact (the fixtures' payloads are compact already).
fn go_relay_envelope(row: &GoRow) -> Vec<u8> {
    let shell: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    let text = |k: &str| shell.get(k).and_then(|v| v.as_str()).unwrap_or("").trim();
    let event_type = text("event_type");
    assert!(
        !event_type.is_empty(),
        "the Go relay refuses a shell with no event type"
    );
    let event_id = match text("event_id") {
        "" => row.id.to_string(),
        id => id.to_owned(),
    };
    let version = match text("event_version") {
        "" => "v1",
        v => v,
    };
    let aggregate = match text("aggregate_id") {
        "" => row.message_key.as_str(),
        a => a,
    };
    let payload = serde_json::value::RawValue::from_string(
        serde_json::to_string(shell.get("payload").unwrap()).unwrap(),
    )
    .unwrap();
    let mut out = format!(
        "{{\"outbox_id\":{},\"event_id\":{},\"event_type\":{},\"event_version\":{}",
        row.id,
        go_string(&event_id),
        go_string(event_type),
        go_string(version)
    );
    if !row.service_name.is_empty() {
        out.push_str(&format!(
            ",\"service_name\":{}",
            go_string(&row.service_name)
        ));
    }
    if !aggregate.is_empty() {
        out.push_str(&format!(",\"aggregate_id\":{}", go_string(aggregate)));
    }
    out.push_str(&format!(",\"payload\":{}}}", payload.get()));
    out.into_bytes()
}

struct GoWorld {
    w: World<MySql>,
    go_table: String,
    outbox: Outbox<MySql>,
}

impl GoWorld {
    async fn new(version: VersionFormat) -> Self {
        let w = World::<MySql>::new().await;
        let go_table = format!("g{}_notification_outbox_messages", w.h.tag);
        let mut conn = w.h.pool.acquire().await.unwrap();
        sqlx::query(&go_ddl(&go_table))
            .execute(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        let outbox = Outbox::builder(w.h.outbox.catalog().clone())
            .config(StoreConfig::default())
            .go_route(
                "notification",
                GoRoute::new(go_table.clone()).version(version),
            )
            .unwrap()
            .build();
        Self {
            w,
            go_table,
            outbox,
        }
    }

    /// A Go row as the Go `CreateMessage` writes it, then `published` as the Go relay leaves
    /// it after sending.
    async fn go_row(&self, key: &str, shell: &str) -> i64 {
        let topic = &self.outbox.catalog().service("notification").unwrap().topic;
        let sql = format!(
            "INSERT INTO {} (biz_type, service_name, topic, message_key, payload, status, \
             retry_count, max_retry, next_retry_at, published_at, created_at, updated_at) \
             VALUES ('notification.feishu.requested', 'notification', ?, ?, ?, 'published', 0, 20, \
             NULL, NOW(), NOW(), NOW())",
            self.go_table
        );
        let done = sqlx::query(&sql)
            .bind(topic)
            .bind(key)
            .bind(shell)
            .execute(&self.w.h.pool)
            .await
            .unwrap();
        i64::try_from(done.last_insert_id()).unwrap()
    }

    async fn read(&self, id: i64) -> GoRow {
        let sql = format!(
            "SELECT id, service_name, message_key, payload FROM {} WHERE id = ?",
            self.go_table
        );
        let (id, service_name, message_key, payload): (i64, String, String, String) =
            sqlx::query_as(&sql)
                .bind(id)
                .fetch_one(&self.w.h.pool)
                .await
                .unwrap();
        GoRow {
            id,
            service_name,
            message_key,
            payload,
        }
    }

    /// `(status, retry_count, last_error, seconds from updated_at to next_retry_at)`.
    async fn state(&self, id: i64) -> (String, i32, Option<String>, Option<i64>) {
        let sql = format!(
            "SELECT status, retry_count, last_error, \
             TIMESTAMPDIFF(SECOND, updated_at, next_retry_at) FROM {} WHERE id = ?",
            self.go_table
        );
        sqlx::query_as(&sql)
            .bind(id)
            .fetch_one(&self.w.h.pool)
            .await
            .unwrap()
    }

    /// Publishes what the Go relay publishes for row `id`: no header, keyed by its
    /// `message_key`.
    async fn go_relay(&self, id: i64) {
        let row = self.read(id).await;
        let topic = self
            .outbox
            .catalog()
            .service("notification")
            .unwrap()
            .topic
            .clone();
        let bus = KafkaBus::new(KafkaConfig::new(brokers())).unwrap();
        bus.send(&Outgoing {
            topic,
            key: Some(row.message_key.clone()),
            value: go_relay_envelope(&row),
            headers: Vec::new(),
        })
        .await
        .unwrap();
    }

    async fn start(&self, recorder: Recorder) -> Running<MySql, KafkaBus> {
        let running = Engine::builder(self.w.h.pool.clone(), KafkaConfig::new(brokers()))
            .outbox(self.outbox.clone())
            .relay(relay())
            .consumer_with::<NotificationEvents, _>(recorder, ConsumerConfig::default())
            .start()
            .await
            .unwrap();
        assert!(
            running.ready(Duration::from_secs(60)).await,
            "no partitions"
        );
        running
    }

    /// Waits until row `id` has `status`, at most 60 s.
    async fn wait_status(&self, id: i64, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.state(id).await;
            if now.0 == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Go row {id} is {now:?}, not {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn cleanup(self) {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", self.go_table))
            .execute(&self.w.h.pool)
            .await
            .unwrap();
        self.w.cleanup().await;
    }
}

/// The stored shell of a Go row (`OutboxEventPayload`) around a feishu event.
fn go_shell(event_id: Option<&str>, version: Option<&str>, payload: &str) -> String {
    let mut out = String::from("{");
    if let Some(id) = event_id {
        out.push_str(&format!("\"event_id\":{},", go_string(id)));
    }
    out.push_str("\"event_type\":\"notification.feishu.requested\"");
    if let Some(v) = version {
        out.push_str(&format!(",\"event_version\":{}", go_string(v)));
    }
    out.push_str(&format!(",\"payload\":{payload}}}"));
    out
}

fn feishu_payload(n: u64) -> String {
    serde_json::to_string(&samples::feishu(n)).unwrap()
}

// Messages the Go relay published are applied once each against their Go rows, which end as the
// Go rules say: consumed; back to pending with the Go backoff after a handler error; dead with
// the reason for an event the service must not process. One whose row is nowhere is
// dead-lettered here, under an id no other Go table's row shares.
#[tokio::test]
async fn go_relayed_messages_are_applied_once_against_their_go_rows() {
    let g = GoWorld::new(VersionFormat::Number).await;
    let recorder = g.w.recorder();
    let explicit = g
        .go_row(
            "7",
            &go_shell(Some("evt-explicit-1"), Some("1"), &feishu_payload(1)),
        )
        .await;
    // No event id (the Go default: the decimal row id) and no version (`v1` on the wire).
    let defaulted = g
        .go_row("8", &go_shell(None, None, &feishu_payload(2)))
        .await;
    let failing = g
        .go_row("9", &go_shell(None, Some("v1"), &feishu_payload(3)))
        .await;
    recorder.failures.lock().unwrap().insert("pv-3".into(), 1);
    // Breaks the contract: an empty preview id.
    let mut bad = samples::feishu(4);
    bad.preview_id = String::new();
    let bad_payload = serde_json::to_string(&bad).unwrap();
    let invalid = g
        .go_row("10", &go_shell(None, Some("1"), &bad_payload))
        .await;
    let running = g.start(recorder.clone()).await;
    for id in [explicit, defaulted, explicit, failing, invalid] {
        g.go_relay(id).await;
    }
    // A message whose row is gone.
    let gone = g
        .go_row("11", &go_shell(None, Some("1"), &feishu_payload(5)))
        .await;
    let gone_row = g.read(gone).await;
    sqlx::query(&format!("DELETE FROM {} WHERE id = ?", g.go_table))
        .bind(gone)
        .execute(&g.w.h.pool)
        .await
        .unwrap();

    g.wait_status(explicit, "consumed").await;
    g.wait_status(defaulted, "consumed").await;
    g.wait_status(invalid, "dead").await;
    // A handler error: pending again, one retry counted, due after the Go backoff (1 s).
    g.wait_status(failing, "pending").await;
    let (_, retries, error, due_in) = g.state(failing).await;
    assert_eq!(retries, 1);
    assert_eq!(due_in, Some(1));
    assert!(error.unwrap().contains("feishu api answered 502"));
    let (_, _, reason, _) = g.state(invalid).await;
    let reason = reason.unwrap();
    assert!(reason.starts_with("invalid_payload"), "{reason}");
    assert!(reason.contains("preview_id"), "{reason}");
    // The Go relay publishes it again, and now it applies.
    g.go_relay(failing).await;
    g.wait_status(failing, "consumed").await;

    let bus = KafkaBus::new(KafkaConfig::new(brokers())).unwrap();
    bus.send(&Outgoing {
        topic: g
            .outbox
            .catalog()
            .service("notification")
            .unwrap()
            .topic
            .clone(),
        key: Some("11".into()),
        value: go_relay_envelope(&gone_row),
        headers: Vec::new(),
    })
    .await
    .unwrap();
    let group = g
        .outbox
        .catalog()
        .service("notification")
        .unwrap()
        .group
        .clone();
    let key = GoRoute::event_id(&g.go_table, gone, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let mut conn = g.w.h.pool.acquire().await.unwrap();
        if let Some(dead) = g.outbox.inbox_dead(&mut conn, &group, &key).await.unwrap() {
            break dead;
        }
        assert!(Instant::now() < deadline, "no dead letter for {key}");
        drop(conn);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    running.shutdown().await.unwrap();
    assert_eq!(dead.reason, "no_go_row");
    assert_eq!(dead.envelope.as_bytes(), go_relay_envelope(&gone_row));

    // Once each: the explicit id as the Go producer gave it, the decimal ones made unique.
    let mut applied: Vec<String> = recorder.traces.lock().unwrap().keys().cloned().collect();
    applied.sort();
    let mut expected = vec![
        "evt-explicit-1".to_owned(),
        GoRoute::event_id(&g.go_table, defaulted, None),
        GoRoute::event_id(&g.go_table, failing, None),
    ];
    expected.sort();
    assert_eq!(applied, expected);
    assert_eq!(g.w.effects().await, (3, 3));
    g.cleanup().await;
}

// An event of a service still served by the Go system is written as a Go row: the shell payload
// with the version as that service's Go handlers spell it, `biz_type`, `retry_count`, DATETIME
// columns, due at once. The Go relay's message for that row is applied by a consumer of ours.
#[tokio::test]
async fn an_event_of_a_go_route_is_written_as_a_go_row_the_go_relay_can_send() {
    for (version, spelled) in [
        (VersionFormat::Number, "1"),
        (VersionFormat::Prefixed, "v1"),
    ] {
        let g = GoWorld::new(version).await;
        let event = samples::feishu(21);
        let mut tx = g.w.h.pool.begin().await.unwrap();
        let done = g.outbox.enqueue(&mut *tx, &event).await.unwrap();
        tx.commit().await.unwrap();
        // Nothing in our table: the row is the Go system's.
        assert_eq!(g.w.h.rows("notification").await, 0);
        let sql = format!(
            "SELECT biz_type, service_name, topic, message_key, status, retry_count, max_retry, \
             next_retry_at IS NOT NULL AND next_retry_at <= NOW(), created_at IS NOT NULL, \
             last_error IS NULL FROM {} WHERE id = ?",
            g.go_table
        );
        #[allow(clippy::type_complexity)]
        let row: (
            String,
            String,
            String,
            String,
            String,
            i32,
            i32,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(&sql)
            .bind(done.id)
            .fetch_one(&g.w.h.pool)
            .await
            .unwrap();
        let route = g.outbox.catalog().service("notification").unwrap();
        assert_eq!(
            row,
            (
                "notification.feishu.requested".to_owned(),
                "notification".to_owned(),
                route.topic.clone(),
                event.user_id.to_string(),
                "pending".to_owned(),
                0,
                20,
                1,
                1,
                1
            )
        );
        let stored = g.read(done.id).await;
        assert_eq!(
            stored.payload,
            format!(
                "{{\"event_id\":\"{}\",\"event_type\":\"notification.feishu.requested\",\
                 \"event_version\":\"{spelled}\",\"aggregate_id\":\"{}\",\"payload\":{}}}",
                done.event_id,
                event.preview_id,
                serde_json::to_string(&event).unwrap()
            )
        );

        // The Go relay sends it; a consumer of ours applies it and marks the Go row consumed.
        let recorder = g.w.recorder();
        let running = g.start(recorder.clone()).await;
        g.go_relay(done.id).await;
        g.wait_status(done.id, "consumed").await;
        running.shutdown().await.unwrap();
        let applied: Vec<String> = recorder.traces.lock().unwrap().keys().cloned().collect();
        assert_eq!(applied, vec![done.event_id.clone()]);
        g.cleanup().await;
    }
}

// A process whose producers moved writes the service's events into our table again, while its
// consumer still applies the Go relay's messages against the Go rows. On a database without the
// Go tables' queries, writing Go rows is refused by name, not attempted.
#[tokio::test]
async fn a_go_route_that_does_not_write_leaves_events_in_our_table() {
    let g = GoWorld::new(VersionFormat::Number).await;
    let outbox = Outbox::<MySql>::builder(g.w.h.outbox.catalog().clone())
        .go_route(
            "notification",
            GoRoute::new(g.go_table.clone()).write(false),
        )
        .unwrap()
        .build();
    let mut tx = g.w.h.pool.begin().await.unwrap();
    let done = outbox
        .enqueue(&mut *tx, &samples::feishu(31))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(g.w.h.rows("notification").await, 1);
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {}", g.go_table))
        .fetch_one(&g.w.h.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let mut conn = g.w.h.pool.acquire().await.unwrap();
    let row = outbox
        .get_by_event_id(&mut conn, "notification", &done.event_id)
        .await
        .unwrap();
    assert!(row.is_some());
    drop(conn);
    g.cleanup().await;

    let sqlite = super::harness::Harness::<sqlx::Sqlite>::new().await;
    let outbox = Outbox::<sqlx::Sqlite>::builder(sqlite.outbox.catalog().clone())
        .go_route("notification", GoRoute::new("notification_outbox_messages"))
        .unwrap()
        .build();
    let mut conn = sqlite.pool.acquire().await.unwrap();
    let refused = outbox
        .enqueue(&mut *conn, &samples::feishu(32))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("Go routes need MySQL or MariaDB"),
        "{refused}"
    );
    drop(conn);
    sqlite.cleanup().await;
}
