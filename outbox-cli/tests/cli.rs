//! The `outbox` binary against real databases (and, for `relay`, the tansu broker that
//! `./scripts/test` starts). Each test has its own tables, named in a config file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use contracts::samples;
use outbox_runtime::route::RouteOverride;
use outbox_runtime::sqlx::{self, Postgres, Sqlite};
use outbox_runtime::store::{Backend, GoRoute};
use outbox_runtime::{Catalog, Outbox, RouteConfig};
use serde_json::Value;

#[path = "support/lost_slot.rs"]
mod lost_slot;

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The tests with replication slots take turns: one of them lowers `max_slot_wal_keep_size`,
/// which is the whole server's, and would invalidate the others' slots.
static WAL_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MARIADB: &str = "mysql://root@127.0.0.1:3306/test";

struct Setup {
    tag: String,
    config: PathBuf,
    url: String,
}

impl Setup {
    fn new(url: &str) -> Self {
        Self::with_relay(url, serde_json::json!({ "poll_ms": 100 }))
    }

    /// A setup whose config file has this `relay` section.
    fn with_relay(url: &str, relay: Value) -> Self {
        Self::with_config(url, serde_json::json!({ "relay": relay }))
    }

    /// A setup whose config file has these sections too.
    fn with_config(url: &str, extra: Value) -> Self {
        let tag = format!("{:08x}", fastrand::u32(..));
        let url = if url == "sqlite" {
            format!(
                "sqlite://{}",
                std::env::temp_dir()
                    .join(format!("outbox-cli-{tag}.db"))
                    .display()
            )
        } else {
            url.to_owned()
        };
        let config = std::env::temp_dir().join(format!("outbox-cli-{tag}.json"));
        let body = serde_json::json!({
            "database_url": url,
            "prefix": format!("cli-{tag}"),
            "services": ["task", "notification"],
            "routes": {
                "task": { "table": format!("c{tag}_task_outbox") },
                "notification": { "table": format!("c{tag}_notification_outbox") }
            },
        });
        let mut body = body;
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        std::fs::write(&config, body.to_string()).unwrap();
        Self { tag, config, url }
    }

    /// The same routes, with the contracts' event types, for writing events.
    fn outbox<DB: Backend>(&self) -> Outbox<DB> {
        Outbox::new(self.catalog())
    }

    fn catalog(&self) -> Catalog {
        let tag = &self.tag;
        let over = |s: &str| RouteOverride::default().table(format!("c{tag}_{s}_outbox"));
        let routes = RouteConfig::new()
            .prefix(&format!("cli-{tag}"))
            .unwrap()
            .override_service("task", over("task"))
            .unwrap()
            .override_service("notification", over("notification"))
            .unwrap();
        Catalog::builder(routes)
            .service::<contracts::TaskEvents>()
            .unwrap()
            .service::<contracts::NotificationEvents>()
            .unwrap()
            .build()
    }

    fn outbox_cmd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(args)
            .env("OUTBOX_CONFIG", &self.config)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    }

    /// Starts `outbox relay` on the test broker, its stderr piped.
    fn relay_daemon(&self) -> Reaped {
        let brokers =
            std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        Reaped(
            Command::new(env!("CARGO_BIN_EXE_outbox"))
                .args(["relay", "--brokers", &brokers])
                .env("OUTBOX_CONFIG", &self.config)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Runs `outbox ARGS`, expecting success; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.exits(0, args).0
    }

    /// Drops this test's tables.
    async fn drop_tables<DB: Backend>(&self, pool: &sqlx::Pool<DB>) {
        let mut conn = pool.acquire().await.unwrap();
        for service in ["task", "notification"] {
            let sql = format!("DROP TABLE IF EXISTS c{}_{service}_outbox", self.tag);
            DB::execute(&mut conn, &sql, Vec::new()).await.unwrap();
        }
    }

    /// `outbox status --json`'s entry of `service`.
    fn status_of(&self, service: &str) -> Value {
        let status = self.json(&["status"]);
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["service"] == service)
            .unwrap_or_else(|| panic!("no status of `{service}` in {status}"))
            .clone()
    }

    /// `outbox args` exits with `code`: its stdout and stderr.
    fn exits(&self, code: i32, args: &[&str]) -> (String, String) {
        let out = self.outbox_cmd(args);
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert_eq!(out.status.code(), Some(code), "outbox {args:?}: {stderr}");
        (stdout, stderr)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A process the test started (a daemon, an import), killed and reaped when the test ends,
/// passed or failed, so that a failing test leaves nothing running.
struct Reaped(std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes 4 task events and 2 notification events, and kills three of them.
async fn fill<DB: Backend>(s: &Setup, pool: &sqlx::Pool<DB>) -> Vec<(String, i64, String)> {
    let outbox = s.outbox::<DB>();
    let mut conn = pool.acquire().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..4 {
        let e = outbox
            .enqueue(&mut conn, &samples::urgency(n))
            .await
            .unwrap();
        ids.push(("task".to_owned(), e.id, e.event_id));
    }
    for n in 0..2 {
        let e = outbox
            .enqueue(&mut conn, &samples::feishu(n))
            .await
            .unwrap();
        ids.push(("notification".to_owned(), e.id, e.event_id));
    }
    for (i, reason) in [
        (0, "invalid_payload"),
        (1, "invalid_payload"),
        (4, "unsupported_version"),
    ] {
        let (service, _, event_id) = &ids[i];
        assert!(
            outbox
                .reject(
                    &mut conn,
                    service,
                    event_id,
                    reason,
                    &format!("{reason}: sample")
                )
                .await
                .unwrap()
        );
    }
    ids
}

async fn lifecycle<DB: Backend>(s: Setup, pool: sqlx::Pool<DB>) {
    // migrate: prints, then creates.
    let sql = s.ok(&["migrate", "--print"]);
    assert!(
        sql.contains(&format!(
            "CREATE TABLE IF NOT EXISTS c{}_task_outbox",
            s.tag
        )),
        "{sql}"
    );
    assert!(s.ok(&["migrate"]).starts_with(&format!(
        "migrated c{}_notification_outbox, c{}_task_outbox",
        s.tag, s.tag
    )));
    s.ok(&["migrate"]);
    let ids = fill(&s, &pool).await;

    // status
    let task = s.status_of("task");
    assert_eq!(task["counts"]["pending"], 2);
    assert_eq!(task["counts"]["dead"], 2);
    assert_eq!(task["dead_by_reason"]["invalid_payload"], 2);
    let table = s.ok(&["status"]);
    assert!(
        table.lines().next().unwrap().starts_with("service"),
        "{table}"
    );
    assert!(table.contains("invalid_payload: 2"), "{table}");

    // dead list with filters
    let all = s.json(&["dead", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 3);
    let by_reason = s.json(&["dead", "list", "--reason", "unsupported"]);
    assert_eq!(by_reason[0]["service"], "notification");
    let by_type = s.json(&[
        "dead",
        "list",
        "--event-type",
        "task.urgency.promote.requested",
        "--to-id",
        &ids[0].1.to_string(),
    ]);
    assert_eq!(by_type.as_array().unwrap().len(), 1);
    assert!(
        s.json(&["dead", "list", "--older-than", "1d"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    // dead show
    let shown = s.json(&["dead", "show", "--service", "task", &ids[0].1.to_string()]);
    assert_eq!(shown["event_id"], ids[0].2.as_str());
    assert_eq!(shown["payload"]["user_id"], 1);

    // replay: dry run changes nothing; then the task rows only.
    let dry = s.json(&["dead", "replay", "--service", "task", "--dry-run"]);
    assert_eq!(dry["would_change"], 2);
    assert_eq!(s.json(&["dead", "list"]).as_array().unwrap().len(), 3);
    assert_eq!(
        s.json(&["dead", "replay", "--service", "task"])["replayed"],
        2
    );
    let task = s.status_of("task");
    assert_eq!(
        (
            task["counts"]["pending"].clone(),
            task["counts"]["dead"].clone()
        ),
        (4.into(), 0.into())
    );

    // republish: two task rows published, their messages never consumed.
    let outbox = s.outbox::<DB>();
    let mut conn = pool.acquire().await.unwrap();
    let claimed = outbox
        .claim(&mut conn, "task", "cli-test", 2, Duration::from_secs(30))
        .await
        .unwrap();
    let claimed: Vec<i64> = claimed.iter().map(|r| r.id).collect();
    assert_eq!(
        outbox
            .mark_published(&mut conn, "task", "cli-test", &claimed)
            .await
            .unwrap(),
        2
    );
    drop(conn);
    let task = s.status_of("task");
    assert!(task["oldest_published_ms"].as_i64().unwrap() >= 0, "{task}");
    assert!(s.ok(&["status"]).contains("oldest published"));
    let none = s.json(&["republish", "--older-than", "1d"]);
    assert!(
        none.as_array().unwrap().iter().all(|x| x["matched"] == 0),
        "{none}"
    );
    let dry = s.json(&[
        "republish",
        "--older-than",
        "0s",
        "--service",
        "task",
        "--dry-run",
    ]);
    assert_eq!(
        (dry[0]["matched"].clone(), dry[0]["republished"].clone()),
        (2.into(), 0.into())
    );
    let text = s.ok(&["republish", "--older-than", "0s", "--service", "task"]);
    assert!(
        text.starts_with("task: 2 of 2 rows published more than 0s ago back to pending"),
        "{text}"
    );
    let task = s.status_of("task");
    assert_eq!(task["counts"]["published"], 0);
    assert_eq!(task["counts"]["pending"], 4);
    assert!(task["oldest_published_ms"].is_null());

    // discard
    assert_eq!(s.json(&["dead", "discard", "--dry-run"])["would_change"], 1);
    assert_eq!(s.json(&["dead", "discard"])["discarded"], 1);
    assert!(s.json(&["dead", "list"]).as_array().unwrap().is_empty());

    s.drop_tables(&pool).await;
}

#[tokio::test]
async fn migrate_status_and_dead_letters_on_postgres() {
    let s = Setup::new(PG);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect(&s.url)
        .await
        .expect("PostgreSQL is unreachable");
    lifecycle::<Postgres>(s, pool).await;
}

#[tokio::test]
async fn migrate_status_and_dead_letters_on_sqlite() {
    let s = Setup::new("sqlite");
    let path = s.url.trim_start_matches("sqlite://").to_owned();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(options)
        .await
        .unwrap();
    lifecycle::<Sqlite>(s, pool).await;
    let _ = std::fs::remove_file(path);
}

#[test]
fn failures_exit_non_zero_with_a_one_line_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "status",
            "--database-url",
            "redis://localhost",
            "--services",
            "task",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("outbox: unsupported database URL"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["status", "--database-url", PG])
        .env_remove("OUTBOX_SERVICES")
        .env_remove("OUTBOX_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .starts_with("outbox: no services")
    );
}

// A route for a service the run does not have would never be used: the config file is refused
// with the name, as is a topic setting no broker can honour. Neither needs a server.
#[test]
fn a_config_file_that_routes_an_unknown_service_or_asks_for_no_partitions_is_refused() {
    let s = Setup::new("sqlite");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.config).unwrap()).unwrap();
    config["routes"]["notifcation"] = serde_json::json!({ "table": "typo_outbox" });
    std::fs::write(&s.config, config.to_string()).unwrap();
    let typo = s.outbox_cmd(&["status"]);

    let zero = Setup::with_relay("sqlite", serde_json::json!({ "topic_partitions": 0 }));
    let no_partitions = zero.outbox_cmd(&["relay", "--brokers", "127.0.0.1:1"]);
    for setup in [&s, &zero] {
        let _ = std::fs::remove_file(&setup.config);
        let _ = std::fs::remove_file(setup.url.trim_start_matches("sqlite://"));
    }

    assert!(!typo.status.success());
    assert_eq!(
        String::from_utf8(typo.stderr).unwrap().trim_end(),
        "outbox: the config file routes service `notifcation`, which is not among the services (task, notification)"
    );
    assert!(!no_partitions.status.success());
    assert_eq!(
        String::from_utf8(no_partitions.stderr).unwrap().trim_end(),
        "outbox: relay.topic_partitions must be at least 1, not 0"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_tree(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

#[test]
fn schema_check_passes_a_new_optional_field_and_fails_a_removed_one() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/schemas");
    let head = std::env::temp_dir().join(format!("outbox-schemas-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&head).unwrap();
    copy_tree(&committed, &head);
    let file = head.join("task.urgency.promote.requested/v1.json");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    schema["properties"]["reason"] = serde_json::json!({ "type": "string" });
    std::fs::write(&file, schema.to_string()).unwrap();
    let check = |base: &Path, head: &Path| {
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["schema", "check", "--base"])
            .arg(base)
            .arg("--head")
            .arg(head)
            .output()
            .unwrap()
    };
    let ok = check(&committed, &head);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8(ok.stdout).unwrap(),
        "compatible: no existing event version changed incompatibly\n"
    );

    schema["properties"]
        .as_object_mut()
        .unwrap()
        .remove("task_ids");
    std::fs::write(&file, schema.to_string()).unwrap();
    let broken = check(&committed, &head);
    assert!(!broken.status.success());
    assert_eq!(
        String::from_utf8(broken.stdout).unwrap(),
        "BREAK task.urgency.promote.requested v1 at $.task_ids: field removed (or renamed)\n"
    );
    assert_eq!(
        String::from_utf8(broken.stderr).unwrap(),
        "outbox: 1 incompatible change(s); publish the new shape as a new version instead\n"
    );
    std::fs::remove_dir_all(&head).unwrap();
}

/// Reads the metrics endpoint.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test]
async fn relay_daemon_publishes_serves_metrics_and_stops_on_sigterm() {
    let s = Setup::with_relay(
        PG,
        serde_json::json!({ "poll_ms": 100, "topic_partitions": 5 }),
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect(&s.url)
        .await
        .expect("PostgreSQL is unreachable");
    s.ok(&["migrate"]);
    let outbox = s.outbox::<Postgres>();
    let mut conn = pool.acquire().await.unwrap();
    for n in 0..3 {
        outbox
            .enqueue(&mut conn, &samples::urgency(n))
            .await
            .unwrap();
    }
    let port = 20_000 + fastrand::u16(..20_000);
    let addr = format!("127.0.0.1:{port}");
    let brokers = std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["relay", "--brokers", &brokers, "--metrics-addr", &addr])
            .env("OUTBOX_CONFIG", &s.config)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task = s.status_of("task");
        if task["counts"]["published"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not publish: {task}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = scrape(&addr);
    assert!(
        metrics.contains("outbox_published_total{service=\"task\"} 3"),
        "{metrics}"
    );
    // The topic it created has the partitions the config file asked for.
    let topic = format!("cli-{}.task.outbox", s.tag);
    let metadata = {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        client
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap()
    };
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len());
    assert_eq!(partitions, Some(5), "topic {topic}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "the daemon did not stop cleanly on SIGTERM: {exit}"
    );
    drop(conn);
    s.drop_tables(&pool).await;
}

// A relay that dies while it runs ends the daemon with an error, not a process that waits for
// SIGTERM and relays nothing: here its table is dropped under it.
#[tokio::test]
async fn relay_daemon_exits_non_zero_when_its_relay_dies_while_it_runs() {
    let s = Setup::new("sqlite");
    let path = s.url.trim_start_matches("sqlite://").to_owned();
    s.ok(&["migrate"]);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&path))
        .await
        .unwrap();
    let outbox = s.outbox::<Sqlite>();
    let mut conn = pool.acquire().await.unwrap();
    outbox
        .enqueue(&mut *conn, &samples::urgency(1))
        .await
        .unwrap();
    let mut child = s.relay_daemon();
    // Running: it published the row.
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.status_of("task")["counts"]["published"] != 1 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon stopped before it published"
        );
        assert!(Instant::now() < deadline, "the daemon did not publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table = format!("c{}_task_outbox", s.tag);
    let sql = format!("DROP TABLE {table}");
    Sqlite::execute(&mut conn, &sql, Vec::new()).await.unwrap();
    let (exit, stderr) = exited(
        &mut child,
        deadline + Duration::from_secs(30),
        "the daemon kept running after its relay lost its table",
    )
    .await;
    assert!(!exit.success(), "the daemon exited 0: {stderr}");
    assert!(
        stderr.contains(&format!(
            "table `{table}` of service `task` is not there; run `outbox migrate`"
        )),
        "{stderr}"
    );
    drop(conn);
    std::fs::remove_file(&path).unwrap();
}

/// A Go outbox table as GORM's AutoMigrate makes it on MySQL (spec §1.1).
fn go_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (id BIGINT NOT NULL AUTO_INCREMENT, biz_type VARCHAR(64) NOT NULL, \
         service_name VARCHAR(64) NOT NULL DEFAULT '', topic VARCHAR(128) NOT NULL, \
         message_key VARCHAR(128) NOT NULL, payload LONGTEXT NOT NULL, status VARCHAR(32) NOT NULL, \
         retry_count INT NOT NULL DEFAULT 0, max_retry INT NOT NULL DEFAULT 20, \
         next_retry_at DATETIME NULL, last_error TEXT NULL, published_at DATETIME NULL, \
         consumed_at DATETIME NULL, created_at DATETIME NULL, updated_at DATETIME NULL, \
         PRIMARY KEY (id), KEY idx_outbox_status_next (status, next_retry_at, biz_type), \
         KEY idx_outbox_service_name (service_name))"
    )
}

/// Waits for a child, at most 120 s.
fn wait_child(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        assert!(Instant::now() < deadline, "the command did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// A Go backlog taken over: `import-go --dry-run` shows what would move and what is refused and
// changes nothing; the import, killed with -9 midway and run again, moves every due row exactly
// once (each batch's rows taken in the Go table and inserted here in one transaction), keeping
// the Go producer's event ids and making the Go defaults unique.
#[tokio::test]
async fn import_go_moves_a_go_backlog_exactly_once_across_a_kill() {
    let s = Setup::new(MARIADB);
    let go = format!("g{}_notification_outbox_messages", s.tag);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.config).unwrap()).unwrap();
    config["go_routes"] = serde_json::json!({ "notification": { "table": go } });
    std::fs::write(&s.config, config.to_string()).unwrap();
    s.ok(&["migrate"]);
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .connect(&s.url)
        .await
        .expect("MariaDB is unreachable");
    sqlx::query(&go_ddl(&go)).execute(&pool).await.unwrap();
    // 6,000 pending rows, as the Go `CreateMessage` writes them: every third with an event id
    // of its producer, the rest with the Go default (none); plus three the Go relay would
    // refuse, a published row and a consumed one.
    let n = 6000;
    let payload = serde_json::to_string(&samples::feishu(1)).unwrap();
    for chunk in (0..n).collect::<Vec<u32>>().chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| {
                let id = if i % 3 == 0 { format!("\"event_id\":\"evt-{i}\",") } else { String::new() };
                format!(
                    "('notification.feishu.requested', 'notification', 't', '{k}', \
                     '{{{id}\"event_type\":\"notification.feishu.requested\",\"event_version\":\"1\",\"payload\":{payload}}}', \
                     'pending', 0, 20, NOW(), NOW(), NOW())",
                    k = i % 97
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO {go} (biz_type, service_name, topic, message_key, payload, status, \
             retry_count, max_retry, next_retry_at, created_at, updated_at) VALUES {}",
            values.join(", ")
        );
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
    for (payload, status) in [
        ("not json", "pending"),
        (r#"{"event_type":"","payload":{}}"#, "pending"),
        (
            r#"{"event_type":"notification.feishu.requested"}"#,
            "pending",
        ),
        (
            r#"{"event_type":"notification.feishu.requested","payload":{}}"#,
            "published",
        ),
        (
            r#"{"event_type":"notification.feishu.requested","payload":{}}"#,
            "consumed",
        ),
    ] {
        let sql = format!(
            "INSERT INTO {go} (biz_type, service_name, topic, message_key, payload, status, \
             created_at, updated_at) VALUES ('notification.feishu.requested', '', 't', '', ?, ?, NOW(), NOW())"
        );
        sqlx::query(&sql)
            .bind(payload)
            .bind(status)
            .execute(&pool)
            .await
            .unwrap();
    }
    let ours = format!("c{}_notification_outbox", s.tag);
    let count = |sql: String| {
        let pool = pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(&sql).fetch_one(&pool).await.unwrap();
            n
        }
    };

    let dry = s.ok(&["import-go", "--table", &go, "--dry-run"]);
    assert!(
        dry.contains("would move go#1 as event evt-0 (notification.feishu.requested v1)"),
        "{dry}"
    );
    assert!(
        dry.contains(&format!(
            "would move go#2 as event {} ",
            GoRoute::event_id(&go, 2, None)
        )),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("refused go#{}: the shell is not JSON", n + 1)),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("refused go#{}: event type is empty", n + 2)),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("refused go#{}: payload is empty", n + 3)),
        "{dry}"
    );
    assert!(
        dry.contains(&format!(
            "would move {n}, refused 3; `{go}` holds: consumed 1, pending {}, published 1",
            n + 3
        )),
        "{dry}"
    );
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM {ours}")).await,
        0,
        "a dry run moved rows"
    );

    // Killed once its first batches are in.
    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["import-go", "--table", &go])
            .env("OUTBOX_CONFIG", &s.config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(format!("SELECT COUNT(*) FROM {ours}")).await == 0 {
        assert!(Instant::now() < deadline, "the import moved nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    let exit = wait_child(&mut child);
    assert!(!exit.success(), "killed, it cannot have finished cleanly");
    let inserted = count(format!("SELECT COUNT(*) FROM {ours}")).await;
    let moved = count(format!("SELECT COUNT(*) FROM {go} WHERE status = 'moved'")).await;
    assert_eq!(
        inserted, moved,
        "a row inserted here and not taken there, or the reverse"
    );
    assert!(
        inserted < i64::from(n),
        "the kill landed after the import: {inserted} rows"
    );

    let done = s.ok(&["import-go", "--table", &go]);
    assert!(
        done.contains(&format!("moved {}, refused 3", i64::from(n) - inserted)),
        "{done}"
    );
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM {ours}")).await,
        i64::from(n)
    );
    assert_eq!(
        count(format!("SELECT COUNT(DISTINCT event_id) FROM {ours}")).await,
        i64::from(n)
    );
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM {go} WHERE status = 'moved'")).await,
        i64::from(n)
    );
    assert_eq!(
        count(format!(
            "SELECT COUNT(*) FROM {go} WHERE status = 'pending'"
        ))
        .await,
        3
    );
    // Each Go row is the event it became: its producer's id, or one derived from table and id.
    let ours_rows: std::collections::HashMap<String, (String, String, i64)> = sqlx::query_as(
        &format!("SELECT event_id, message_key, status, event_version FROM {ours}"),
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(e, k, s, v): (String, String, String, i64)| (e, (k, s, v)))
    .collect();
    let go_rows: Vec<(i64, String, String)> = sqlx::query_as(&format!(
        "SELECT id, payload, message_key FROM {go} WHERE status = 'moved'"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    for (id, payload, key) in go_rows {
        let shell: Value = serde_json::from_str(&payload).unwrap();
        let event_id = GoRoute::event_id(&go, id, shell["event_id"].as_str());
        assert_eq!(
            ours_rows.get(&event_id),
            Some(&(key, "pending".to_owned(), 1)),
            "Go row {id}"
        );
    }
    // Run again: nothing left to move.
    let again = s.ok(&["import-go", "--table", &go]);
    assert!(again.contains("moved 0, refused 3"), "{again}");
    sqlx::query(&format!("DROP TABLE {go}"))
        .execute(&pool)
        .await
        .unwrap();
    s.drop_tables(&pool).await;
}

// An inbox consumer's dead letters, in its own database: listed, shown, discarded, and replayed
// by publishing the stored envelope again (with its key) and forgetting the inbox record.
#[tokio::test]
async fn dead_letters_of_an_inbox_consumer_are_listed_shown_discarded_and_replayed() {
    use outbox_runtime::bus::{KafkaBus, KafkaConfig, Publish as _};
    use outbox_runtime::store::InboxDead;
    let s = Setup::new("sqlite");
    let path = s.url.trim_start_matches("sqlite://").to_owned();
    s.ok(&["migrate"]);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&path))
        .await
        .unwrap();
    let brokers = std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = format!("cli-{}.inbox-replay", s.tag);
    let bus = KafkaBus::new(KafkaConfig::new(&brokers).partitions(1)).unwrap();
    bus.ensure_topics(std::slice::from_ref(&topic))
        .await
        .unwrap();
    let group = format!("g-{}", s.tag);
    let outbox = s.outbox::<Sqlite>();
    let dead = |event_id: &str, reason: &str| InboxDead {
        group: group.clone(),
        event_id: event_id.to_owned(),
        event_type: "task.urgency.promote.requested".to_owned(),
        event_version: 1,
        topic: topic.clone(),
        reason: reason.to_owned(),
        last_error: format!("{reason}: sample"),
        attempts: 1,
        envelope: format!(r#"{{"outbox_id":1,"event_id":"{event_id}"}}"#),
        dead_at: 1,
        message_key: Some("u-7".to_owned()),
    };
    let mut conn = pool.acquire().await.unwrap();
    for d in [dead("e-1", "max_attempts"), dead("e-2", "handler_rejected")] {
        assert!(
            outbox
                .record_inbox(&mut conn, &group, &d.event_id)
                .await
                .unwrap()
        );
        outbox.record_inbox_dead(&mut conn, &d).await.unwrap();
    }
    drop(conn);

    let listed = s.json(&["dead", "list", "--group", &group]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(listed[0]["event_id"], "e-1");
    let table = s.ok(&["dead", "list", "--group", &group, "--reason", "rejected"]);
    assert!(table.contains("e-2") && !table.contains("e-1"), "{table}");
    let shown = s.json(&["dead", "show", "--group", &group, "e-1"]);
    assert_eq!(shown["envelope"]["event_id"], "e-1");
    assert_eq!(shown["message_key"], "u-7");
    let dry = s.json(&[
        "dead",
        "discard",
        "--group",
        &group,
        "--reason",
        "rejected",
        "--dry-run",
    ]);
    assert_eq!(dry["would_change"], 1);
    assert_eq!(
        s.json(&["dead", "discard", "--group", &group, "--reason", "rejected"])["discarded"],
        1
    );

    assert_eq!(
        s.json(&["dead", "replay", "--group", &group, "--brokers", &brokers])["replayed"],
        1
    );
    assert!(
        s.json(&["dead", "list", "--group", &group])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let mut conn = pool.acquire().await.unwrap();
    assert!(
        outbox.record_inbox(&mut conn, &group, "e-1").await.unwrap(),
        "the replayed event's inbox record is forgotten, so it is applied again"
    );
    drop(conn);
    let high = {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        client
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .unwrap()
            .1
    };
    assert_eq!(high, 1, "the stored envelope is on its topic again");
    pool.close().await;
    let _ = std::fs::remove_file(path);
}

/// Enqueues the sample urgency events `range`, each committed alone; their event ids.
async fn urgencies(
    outbox: &Outbox<Postgres>,
    conn: &mut sqlx::PgConnection,
    range: std::ops::Range<u64>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for n in range {
        let done = outbox.enqueue(conn, &samples::urgency(n)).await.unwrap();
        ids.push(done.event_id);
    }
    ids
}

/// The event ids on `topic`, every partition from the start, until `want` are all there (at most
/// 60 s): duplicates are allowed, a missing event is not.
fn wait_on_the_broker(brokers: &str, topic: &str, want: &[String]) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::{Message as _, Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("cli-check-{:08x}", fastrand::u32(..)))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..3 {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = std::collections::HashSet::new();
    while !want.iter().all(|id| seen.contains(id)) {
        assert!(
            Instant::now() < deadline,
            "{} of {} events reached {topic}",
            want.iter().filter(|id| seen.contains(*id)).count(),
            want.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        let value: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        seen.insert(value["event_id"].as_str().unwrap().to_owned());
    }
}

/// Waits for `child` (its stderr piped) to exit by `deadline`, else kills it and fails with
/// `ran_on`: its exit status and stderr.
async fn exited(
    child: &mut std::process::Child,
    deadline: Instant,
    ran_on: &str,
) -> (std::process::ExitStatus, String) {
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{ran_on}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (exit, stderr)
}

/// A setup whose `task` is relayed from the write-ahead log, migrated (its slot made): the
/// pool, the outbox that writes its events, and the slot.
async fn wal_setup() -> (Setup, sqlx::PgPool, Outbox<Postgres>, String) {
    wal_setup_with(serde_json::json!({ "poll_ms": 100 })).await
}

/// Drops a [`wal_setup`]'s slot and tables.
async fn wal_cleanup(s: &Setup, pool: &sqlx::PgPool, slot: &str) {
    drop_slot(pool, slot).await;
    s.drop_tables(pool).await;
}

async fn drop_slot(pool: &sqlx::PgPool, slot: &str) {
    sqlx::query("SELECT pg_drop_replication_slot($1)::TEXT")
        .bind(slot)
        .execute(pool)
        .await
        .unwrap();
}

/// [`wal_setup`] with this `relay` section in the config file.
async fn wal_setup_with(relay: Value) -> (Setup, sqlx::PgPool, Outbox<Postgres>, String) {
    let s = Setup::with_config(
        PG,
        serde_json::json!({ "relay": relay, "wal_services": ["task"] }),
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect(&s.url)
        .await
        .expect("PostgreSQL is unreachable");
    s.ok(&["migrate"]);
    let outbox = Outbox::<Postgres>::builder(s.catalog())
        .wal("task")
        .unwrap()
        .build();
    let slot = outbox.wal_slot("task").unwrap();
    (s, pool, outbox, slot)
}

// A service relayed from the write-ahead log (`wal_services`): `migrate` makes its slot,
// `status` shows the slot's lag in bytes and age, a daemon publishes from it and serves the lag
// gauges, and when that daemon is killed with -9 another takes the slot over and publishes what
// was left, from the slot's position.
#[tokio::test]
async fn a_wal_service_is_relayed_from_its_slot_and_a_second_daemon_takes_over_a_killed_one() {
    let _turn = WAL_TESTS.lock().await;
    let (s, pool, outbox, slot) = wal_setup().await;
    let mut conn = pool.acquire().await.unwrap();
    let mut ids = urgencies(&outbox, &mut conn, 0..5).await;
    // Waiting in the slot, no relay on it.
    let waiting = s.status_of("task");
    assert!(
        waiting["wal"]["lag_bytes"].as_i64().unwrap() > 0,
        "{waiting}"
    );
    assert!(
        waiting["wal"]["lag_age_ms"].as_i64().unwrap() > 0,
        "{waiting}"
    );
    assert_eq!(waiting["wal"]["relay_active"], false, "{waiting}");
    assert_eq!(waiting["wal"]["slot"], slot.as_str());
    assert_eq!(waiting["counts"]["pending"], 0, "no row: {waiting}");
    let table = s.ok(&["status"]);
    assert!(
        table.contains("replication slot") && table.contains(&slot),
        "{table}"
    );

    let brokers = std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = format!("cli-{}.task.outbox", s.tag);
    let port = 20_000 + fastrand::u16(..20_000);
    let addr = format!("127.0.0.1:{port}");
    let daemon = |metrics: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox"));
        cmd.args(["relay", "--brokers", &brokers])
            .env("OUTBOX_CONFIG", &s.config)
            .stderr(std::process::Stdio::null());
        if let Some(addr) = metrics {
            cmd.args(["--metrics-addr", addr]);
        }
        Reaped(cmd.spawn().unwrap())
    };
    let mut first = daemon(Some(&addr));
    wait_on_the_broker(&brokers, &topic, &ids);
    // The relay records what it last saw every few seconds; the gauges follow.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task = s.status_of("task");
        let metrics = scrape(&addr);
        if task["wal"]["relay_active"] == true
            && task["wal"]["lag_age_ms"] == 0
            && metrics.contains("outbox_wal_lag_bytes{service=\"task\"}")
            && metrics.contains("outbox_wal_lag_seconds{service=\"task\"} 0")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the drained slot's lag was not shown: {task}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    ids.extend(urgencies(&outbox, &mut conn, 5..10).await);
    let mut second = daemon(None);
    wait_on_the_broker(&brokers, &topic, &ids);
    Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(second.wait().unwrap().success());
    let after = s.status_of("task");
    assert_eq!(after["wal"]["relay_active"], false, "{after}");
    assert_eq!(after["wal"]["lag_age_ms"], 0, "nothing waits: {after}");
    drop(conn);
    wal_cleanup(&s, &pool, &slot).await;
}

// A relay whose database URL has no password, the server asking for one (SCRAM; the role's
// line in pg_hba.conf is `scripts/servers.sh`'s), finds it in the password file, `:` and `\`
// escaped in it: for the pool (`store::connect_options`: sqlx 0.8 would keep the escapes) and
// for the replication stream, which sqlx does not open. No other source has it: no PGPASSWORD,
// no ~/.pgpass.
#[tokio::test]
async fn a_wal_relay_whose_password_is_only_in_the_password_file_streams_with_it() {
    let _turn = WAL_TESTS.lock().await;
    let (s, pool, outbox, slot) = wal_setup().await;
    let role = "outbox_pgpass";
    let password = r"pg:pass\word";
    let mut conn = pool.acquire().await.unwrap();
    let statements = [
        format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') \
             THEN CREATE ROLE {role} LOGIN REPLICATION; END IF; END $$"
        ),
        format!("ALTER ROLE {role} PASSWORD '{password}'"),
        format!(
            "GRANT ALL ON c{0}_task_outbox, c{0}_notification_outbox TO {role}",
            s.tag
        ),
        format!(
            "GRANT ALL ON SEQUENCE c{0}_task_outbox_id_seq, c{0}_notification_outbox_id_seq TO {role}",
            s.tag
        ),
    ];
    for sql in &statements {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    let ids = urgencies(&outbox, &mut conn, 0..3).await;
    let home = std::env::temp_dir().join(format!("outbox-cli-{}-home", s.tag));
    std::fs::create_dir_all(&home).unwrap();
    let file = home.join("passwords");
    std::fs::write(
        &file,
        format!("# the relay's\n127.0.0.1:5432:*:{role}:pg\\:pass\\\\word\n"),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let brokers = std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let url = format!("postgres://{role}@127.0.0.1:5432/test");
    let mut daemon = Reaped(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["relay", "--brokers", &brokers, "--database-url", &url])
            .env("OUTBOX_CONFIG", &s.config)
            .env("PGPASSFILE", &file)
            .env("HOME", &home)
            .env_remove("PGPASSWORD")
            .env_remove("DATABASE_URL")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_on_the_broker(&brokers, &format!("cli-{}.task.outbox", s.tag), &ids);
    // Streamed: the slot was held by a replication connection of that role.
    let streamed: Option<String> = sqlx::query_scalar(
        "SELECT a.usename::TEXT FROM pg_replication_slots s \
         JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
    )
    .bind(&slot)
    .fetch_optional(&mut *conn)
    .await
    .unwrap();
    assert_eq!(streamed.as_deref(), Some(role));
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    let (exit, stderr) = exited(
        &mut daemon,
        Instant::now() + Duration::from_secs(60),
        "the relay did not stop on SIGTERM",
    )
    .await;
    assert!(exit.success(), "{stderr}");
    drop(conn);
    wal_cleanup(&s, &pool, &slot).await;
    std::fs::remove_dir_all(&home).unwrap();
}

// A relay whose replication stream the server refuses (a wrong password) says so on stderr,
// with the fix, and keeps trying (the password may be fixed, or the server come back) without
// stopping: the runtime's warnings reach the operator.
#[tokio::test]
async fn a_refused_stream_is_reported_on_stderr_with_the_fix_and_tried_again() {
    let _turn = WAL_TESTS.lock().await;
    let (s, pool, _, slot) = wal_setup_with(serde_json::json!({
        "poll_ms": 100,
        "replication_url": "postgres://outbox_pgpass:wrong@127.0.0.1:5432/test"
    }))
    .await;
    let mut daemon = s.relay_daemon();
    let stderr = daemon.stderr.take().unwrap();
    let (lines, warnings) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("relay round failed") && lines.send(line).is_err() {
                return;
            }
        }
    });
    // Two warnings: the first refusal, and the attempt after it.
    for n in 0..2 {
        let line = warnings
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{n} warnings of a refused stream on stderr"));
        assert!(
            line.contains(&slot)
                && line.contains("password authentication failed")
                && line.contains("PGPASSWORD"),
            "{line}"
        );
    }
    assert!(daemon.try_wait().unwrap().is_none(), "it keeps trying");
    drop(daemon);
    wal_cleanup(&s, &pool, &slot).await;
}

// A WAL service without its slot (dropped by hand): nothing keeps its events for a relay, so
// `status` says "no slot" and exits 2 naming the fix; `migrate` makes the slot again, and then
// `status` exits 0.
#[tokio::test]
async fn a_missing_slot_makes_status_exit_2_until_migrate_makes_it() {
    let _turn = WAL_TESTS.lock().await;
    let (s, pool, _outbox, slot) = wal_setup().await;
    assert!(s.status_of("task")["wal"]["lag_bytes"].is_i64());
    drop_slot(&pool, &slot).await;

    let (table, stderr) = s.exits(2, &["status"]);
    assert!(table.contains("no slot"), "{table}");
    assert!(
        stderr.contains(&format!(
            "replication slot `{slot}` of service `task` does not exist"
        )) && stderr.contains("outbox migrate"),
        "{stderr}"
    );
    let (json, _) = s.exits(2, &["status", "--json"]);
    assert!(json.contains("\"lag_bytes\": null"), "{json}");

    s.ok(&["migrate"]);
    assert!(s.status_of("task")["wal"]["lag_bytes"].is_i64());
    wal_cleanup(&s, &pool, &slot).await;
}

// A slot PostgreSQL invalidated (past `max_slot_wal_keep_size`): `status` shows it LOST
// (`"lost": true` and no age in JSON) and exits 2 with the fix, and `relay` exits non-zero
// naming the slot and the fix rather than run on with nothing to read.
#[tokio::test]
async fn a_lost_slot_is_shown_lost_and_the_relay_exits_naming_the_fix() {
    let _turn = WAL_TESTS.lock().await;
    let (s, pool, outbox, slot) = wal_setup().await;
    let mut conn = pool.acquire().await.unwrap();
    urgencies(&outbox, &mut conn, 0..3).await;
    drop(conn);
    assert_eq!(s.ok(&["status"]).matches("LOST").count(), 0, "not lost yet");
    lost_slot::invalidate(&pool, &slot).await;

    let fix = format!("pg_drop_replication_slot('{slot}')");
    let (json, stderr) = s.exits(2, &["status", "--json"]);
    let status: Value = serde_json::from_str(&json).unwrap();
    let task = status
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["service"] == "task")
        .unwrap();
    assert_eq!(task["wal"]["lost"], true, "{task}");
    assert_eq!(task["wal"]["lag_age_ms"], Value::Null, "{task}");
    assert!(stderr.contains(&fix), "{stderr}");
    let (table, stderr) = s.exits(2, &["status"]);
    assert!(table.contains("LOST"), "{table}");
    assert!(
        stderr.contains(&fix) && stderr.contains("outbox migrate"),
        "{stderr}"
    );

    let mut relay = s.relay_daemon();
    let (status, stderr) = exited(
        &mut relay,
        Instant::now() + Duration::from_secs(60),
        "the relay ran on for 60 s with a lost slot",
    )
    .await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&fix), "{stderr}");

    wal_cleanup(&s, &pool, &slot).await;
}
