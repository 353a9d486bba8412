//! Living beside the Go system (spec §1, §3, §5.4): a service whose table is still in the Go
//! schema. Its events are written as Go rows (the shell payload, `biz_type`, `retry_count`,
//! DATETIME columns), so the Go relay and consumers handle them unchanged, and the messages
//! the Go relay publishes are applied against those rows by the Go rules. The Go system ran on
//! MySQL only, and so does this: on another database a Go route is refused when it is used.

use std::fmt::Write as _;

use outbox_contract::envelope::VersionFormat;

use super::{Arg, Backend, Outbox, Prepared, TableSql};
use crate::error::Error;

/// A service still served by the Go system: its table in the Go schema and how its Go
/// handlers spell `event_version`.
///
/// ```
/// use outbox_runtime::envelope::VersionFormat;
/// use outbox_runtime::store::GoRoute;
///
/// // The Go notification handlers accept "" and "1"; forum and credit "" and "v1".
/// let notification = GoRoute::new("notification_outbox_messages");
/// let token_store = GoRoute::new("token_store_outbox_messages").version(VersionFormat::Prefixed);
/// assert_eq!(token_store.max_retry, 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GoRoute {
    /// The Go table (`notification_outbox_messages`).
    pub table: String,
    /// How the shell payload spells `event_version` (`"1"` by default).
    pub version: VersionFormat,
    /// The `max_retry` of the rows written (20, the Go default).
    pub max_retry: i32,
    /// Whether `enqueue` writes this service's events as Go rows (true). Off, they go into
    /// this outbox's table while its consumers still apply the Go relay's messages against
    /// the Go rows: the state once the producers of a process moved and the Go relay still
    /// sends what Go producers write.
    pub write: bool,
}

impl GoRoute {
    /// The route of a service whose Go table is `table`.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            version: VersionFormat::Number,
            max_retry: 20,
            write: true,
        }
    }

    /// Whether `enqueue` writes this service's events as Go rows.
    pub fn write(mut self, write: bool) -> Self {
        self.write = write;
        self
    }

    /// How `event_version` is spelled in the rows written.
    pub fn version(mut self, version: VersionFormat) -> Self {
        self.version = version;
        self
    }

    /// The rows' `max_retry` (0 or less: 20).
    pub fn max_retry(mut self, max_retry: i32) -> Self {
        self.max_retry = if max_retry > 0 { max_retry } else { 20 };
        self
    }

    /// The Go naming convention's table of `service` (`DefaultServiceRoute`): `-` as `_`, then
    /// `_outbox_messages`.
    pub fn convention(service: &str) -> String {
        format!("{}_outbox_messages", service.replace('-', "_"))
    }

    /// The event id of Go row `go_id` of `table`, the same wherever the row is met (a message
    /// the Go relay published, `outbox import-go`): the id its producer `given` when there is
    /// one that fits an event id (at most 36 characters), else a UUID (version 5) derived from
    /// the table and the row id. The Go default, the decimal row id, is not kept: rows of
    /// other Go tables share it.
    ///
    /// ```
    /// use outbox_runtime::store::GoRoute;
    ///
    /// assert_eq!(GoRoute::event_id("task_outbox_messages", 7, Some("evt-7")), "evt-7");
    /// let derived = GoRoute::event_id("task_outbox_messages", 7, Some("7"));
    /// assert_eq!(derived, GoRoute::event_id("task_outbox_messages", 7, None));
    /// assert_ne!(derived, GoRoute::event_id("memory_outbox_messages", 7, None));
    /// assert_eq!(derived.len(), 36);
    /// ```
    pub fn event_id(table: &str, go_id: i64, given: Option<&str>) -> String {
        match given.map(str::trim) {
            Some(id) if !id.is_empty() && id != go_id.to_string() && id.chars().count() <= 36 => {
                id.to_owned()
            }
            _ => {
                uuid::Uuid::new_v5(&GO_NAMESPACE, format!("{table}:{go_id}").as_bytes()).to_string()
            }
        }
    }
}

/// The namespace of the event ids derived from Go rows.
const GO_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5c1b_7d2e_0a4f_4e3b_9c61_6f75_7462_6f78);

/// A Go table name: `[a-z_][a-z0-9_]*`, at most 64 characters.
pub(super) fn check_table(table: &str) -> Result<(), Error> {
    let mut chars = table.chars();
    let ok = table.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Contract(outbox_contract::Error::InvalidName {
            what: "table",
            name: table.to_owned(),
            reason: "a Go table name is [a-z_][a-z0-9_]*, at most 64 characters".to_owned(),
        }))
    }
}

/// A Go table's route and its queries.
#[derive(Debug)]
pub(super) struct GoTable {
    pub(super) route: GoRoute,
    pub(super) sql: TableSql,
}

/// What became of a Go row after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoRetry {
    /// Pending again, after the Go backoff.
    Pending,
    /// Out of retries: dead.
    Dead,
    /// Already consumed, dead or moved: unchanged.
    Settled,
}

/// `last_error` as the Go system keeps it: at most 2,000 bytes, cut on a character boundary
/// (the Go code cut bytes, splitting characters).
fn go_error(reason: &str) -> String {
    super::truncate_chars(reason, 2000).to_owned()
}

/// The Go stored payload shell (`OutboxEventPayload`, §6.2), its fields in the Go struct's
/// order, as Go's `json.Marshal` writes it; the payload embedded as is.
pub(super) fn shell(p: &Prepared, version: VersionFormat) -> Result<String, Error> {
    let quote = |s: &str| serde_json::to_string(s).map_err(Error::Encode);
    let version = match version {
        VersionFormat::Number => p.version.to_string(),
        VersionFormat::Prefixed => format!("v{}", p.version),
    };
    let mut out = String::with_capacity(p.payload.len() + 200);
    let _ = write!(
        out,
        "{{\"event_id\":{},\"event_type\":{},\"event_version\":{}",
        quote(&p.event_id)?,
        quote(p.event_type)?,
        quote(&version)?,
    );
    if let Some(agg) = p.aggregate.as_deref().or(p.key.as_deref()) {
        let _ = write!(out, ",\"aggregate_id\":{}", quote(agg)?);
    }
    let _ = write!(out, ",\"payload\":{}}}", p.payload.trim());
    Ok(out)
}

impl<DB: Backend> Outbox<DB> {
    /// The Go route of `service`, when it is still served by the Go system.
    pub fn go_route(&self, service: &str) -> Option<&GoRoute> {
        self.inner.go.get(service).map(|t| &t.route)
    }

    /// The Go table of `service` and its query `name`; refused where the database has no Go
    /// queries (the Go system ran on MySQL).
    fn go_sql(&self, service: &str, name: &str) -> Result<(&GoTable, &str), Error> {
        let go = self.inner.go.get(service).ok_or_else(|| Error::NoGoRoute {
            service: service.to_owned(),
        })?;
        let sql = go
            .sql
            .find(name)
            .ok_or(Error::GoUnsupported { backend: DB::NAME })?;
        Ok((go, sql))
    }

    /// Writes a prepared event as a Go row of its service's Go table.
    pub(super) async fn insert_go(
        &self,
        conn: &mut DB::Connection,
        p: Prepared,
    ) -> Result<i64, Error> {
        let (go, sql) = self.go_sql(p.service, "go_insert")?;
        let shell = shell(&p, go.route.version)?;
        let args = vec![
            Arg::Str(p.event_type.to_owned()),
            Arg::Str(p.service.to_owned()),
            Arg::Str(p.topic),
            Arg::Str(p.key.unwrap_or_default()),
            Arg::Str(shell),
            Arg::I64(i64::from(go.route.max_retry)),
        ];
        Ok(DB::insert(conn, sql, args).await?)
    }

    /// The status and `retry_count` of Go row `id` of `service`'s Go table, locked in `tx`;
    /// `None` when there is no such row.
    pub async fn go_lock(
        &self,
        tx: &mut DB::Connection,
        service: &str,
        id: i64,
    ) -> Result<Option<(String, i64)>, Error> {
        let (_, sql) = self.go_sql(service, "go_lock")?;
        Ok(DB::fetch_pairs(tx, sql, vec![Arg::I64(id)])
            .await?
            .into_iter()
            .next())
    }

    /// Marks Go row `id` consumed, as the Go handlers' `ConsumeAndMarkConsumed` does; false when
    /// it was already settled.
    pub async fn go_consumed(
        &self,
        tx: &mut DB::Connection,
        service: &str,
        id: i64,
    ) -> Result<bool, Error> {
        let (_, sql) = self.go_sql(service, "go_consumed")?;
        Ok(DB::execute(tx, sql, vec![Arg::I64(id)]).await? == 1)
    }

    /// Marks Go row `id` dead with `reason` (`MarkDead`, but never over a consumed row).
    pub async fn go_dead(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        id: i64,
        reason: &str,
    ) -> Result<bool, Error> {
        let (_, sql) = self.go_sql(service, "go_dead")?;
        let args = vec![Arg::Str(go_error(reason)), Arg::I64(id)];
        Ok(DB::execute(conn, sql, args).await? == 1)
    }

    /// One more failure of Go row `id`, by the Go rule (`MarkFailedForRetry`): dead when
    /// `retry_count` reaches `max_retry`, else pending again after `min(n, 10)²` seconds.
    pub async fn go_retry(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        id: i64,
        reason: &str,
    ) -> Result<GoRetry, Error> {
        let (_, sql) = self.go_sql(service, "go_retry")?;
        let args = vec![Arg::Str(go_error(reason)), Arg::I64(id)];
        if DB::execute(conn, sql, args).await? == 0 {
            return Ok(GoRetry::Settled);
        }
        let (_, status) = self.go_sql(service, "go_status")?;
        let now = DB::fetch_pairs(conn, status, vec![Arg::I64(id)]).await?;
        Ok(match now.first() {
            Some((s, _)) if s == "dead" => GoRetry::Dead,
            _ => GoRetry::Pending,
        })
    }
}

/// A Go row due for import.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct GoDue {
    pub id: i64,
    pub service_name: String,
    pub message_key: String,
    pub payload: String,
}

/// What `Outbox::import_go` did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GoImport {
    /// The Go table.
    pub table: String,
    /// The service whose table took the rows.
    pub service: String,
    /// Rows moved (or that would move).
    pub moved: Vec<GoMoved>,
    /// Rows left where they are, with the reason.
    pub refused: Vec<GoRefused>,
    /// The Go table's rows per status afterwards (before, when dry).
    pub left: Vec<(String, i64)>,
}

/// A Go row moved into this outbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GoMoved {
    /// The Go row id.
    pub go_id: i64,
    /// The row id in this outbox's table (`None` when dry).
    pub id: Option<i64>,
    /// The event id ([`GoRoute::event_id`]).
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// The version.
    pub version: u32,
}

/// A Go row the import left in its table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GoRefused {
    /// The Go row id.
    pub go_id: i64,
    /// Why.
    pub reason: String,
}

/// A Go shell, parsed by the Go rules (`parseOutboxEventPayload`: valid JSON, an event type,
/// a payload), into what an outbox row needs.
#[derive(Debug)]
struct Shell {
    event_id: Option<String>,
    event_type: String,
    version: u32,
    aggregate_id: Option<String>,
    payload: String,
}

fn parse_shell(text: &str) -> Result<Shell, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the shell is not JSON: {e}"))?;
    let text_of = |k: &str| -> Result<Option<String>, String> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(other) => Err(format!("the shell's {k} is not a string: {other}")),
        }
    };
    let event_type = text_of("event_type")?.ok_or("event type is empty")?;
    let version = outbox_contract::envelope::parse_version(v.get("event_version"))
        .map_err(|e| e.to_string())?;
    let payload = v.get("payload").ok_or("payload is empty")?.to_string();
    Ok(Shell {
        event_id: text_of("event_id")?,
        event_type,
        version,
        aggregate_id: text_of("aggregate_id")?,
        payload,
    })
}

impl<DB: Backend> Outbox<DB> {
    /// Moves the pending rows of Go table `table` into `service`'s table, each exactly once:
    /// a batch's rows are taken in the Go table (a compare-and-set from `pending` to `moved`)
    /// and inserted here in one transaction, so a crash midway repeats nothing and loses
    /// nothing, and a second run takes only what is still pending. Each keeps its event id
    /// (one derived from the table and row id for the Go default, [`GoRoute::event_id`]),
    /// type, version, key and
    /// aggregate, and is due at once with a fresh attempt budget. A row that does not fit
    /// (a shell the Go relay would refuse, another service's) is left pending and reported.
    /// With `dry_run`, nothing changes. Stop the Go relay of that table first: it would
    /// publish rows the import is moving.
    pub async fn import_go(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        table: &str,
        dry_run: bool,
        limit: usize,
    ) -> Result<GoImport, Error> {
        check_table(table)?;
        let ours = self.table(service)?;
        let mut at = ours.route.clone();
        at.table = table.to_owned();
        let go = TableSql::new::<DB>(at);
        let find = |name: &str| {
            go.find(name)
                .ok_or(Error::GoUnsupported { backend: DB::NAME })
        };
        let (due, take, counts) = (find("go_due")?, find("go_take")?, find("go_counts")?);
        let mut out = GoImport {
            table: table.to_owned(),
            service: service.to_owned(),
            ..GoImport::default()
        };
        let mut after = 0;
        let mut taken = 0;
        while taken < limit {
            let batch = (limit - taken).min(200);
            let args = vec![
                Arg::I64(after),
                Arg::I64(i64::try_from(batch).unwrap_or(200)),
            ];
            let rows = DB::fetch_go_due(conn, due, args).await?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            let mut tx = DB::begin_write(conn).await?;
            for row in rows {
                taken += 1;
                let shell = match parse_shell(&row.payload) {
                    Ok(shell) if row.service_name.is_empty() || row.service_name == service => {
                        shell
                    }
                    Ok(_) => {
                        let reason = format!("a row of service `{}`", row.service_name);
                        out.refused.push(GoRefused {
                            go_id: row.id,
                            reason,
                        });
                        continue;
                    }
                    Err(reason) => {
                        out.refused.push(GoRefused {
                            go_id: row.id,
                            reason,
                        });
                        continue;
                    }
                };
                let event_id = GoRoute::event_id(table, row.id, shell.event_id.as_deref());
                let mut moved = GoMoved {
                    go_id: row.id,
                    id: None,
                    event_id,
                    event_type: shell.event_type,
                    version: shell.version,
                };
                if !dry_run {
                    let note = format!(
                        "moved to `{}` as event {}",
                        ours.route.table, moved.event_id
                    );
                    let args = vec![Arg::Str(note), Arg::I64(row.id)];
                    if DB::execute(&mut tx, take, args).await? != 1 {
                        // Taken meanwhile (another import, the Go relay): not ours to move.
                        continue;
                    }
                    let now = self.now_ms();
                    let key = Some(row.message_key).filter(|k| !k.is_empty());
                    let args = vec![
                        Arg::Str(moved.event_id.clone()),
                        Arg::Str(moved.event_type.clone()),
                        Arg::I64(i64::from(moved.version)),
                        Arg::Str(service.to_owned()),
                        Arg::Str(ours.route.topic.clone()),
                        Arg::OptStr(key),
                        Arg::OptStr(shell.aggregate_id),
                        Arg::Str(shell.payload),
                        Arg::Str("{}".to_owned()),
                        Arg::I64(i64::from(self.inner.config.max_attempts)),
                        Arg::I64(now),
                        Arg::I64(now),
                        Arg::I64(now),
                    ];
                    moved.id = Some(DB::insert(&mut tx, ours.get("insert"), args).await?);
                }
                out.moved.push(moved);
            }
            tx.commit().await?;
        }
        if !dry_run && !out.moved.is_empty() {
            self.inner.wake.notify_waiters();
        }
        out.left = DB::fetch_pairs(conn, counts, Vec::new()).await?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_go_error_is_cut_at_2000_bytes_on_a_character_boundary() {
        let long = "失".repeat(700);
        let cut = go_error(&long);
        assert!(cut.len() <= 2000);
        assert_eq!(cut.len(), 1998);
        assert!(long.starts_with(&cut));
        assert_eq!(go_error("short"), "short");
    }

    #[test]
    fn a_go_shell_is_parsed_by_the_go_rules() {
        let s =
            parse_shell(r#"{"event_type":"a.b","event_version":"v2","payload":{"x":1}}"#).unwrap();
        assert_eq!((s.event_type.as_str(), s.version), ("a.b", 2));
        assert_eq!((s.event_id, s.payload.as_str()), (None, r#"{"x":1}"#));
        assert_eq!(
            parse_shell(r#"{"event_type":" ","payload":{}}"#).err(),
            Some("event type is empty".to_owned())
        );
        assert_eq!(
            parse_shell(r#"{"event_type":"a.b"}"#).err(),
            Some("payload is empty".to_owned())
        );
        assert!(
            parse_shell("not json")
                .unwrap_err()
                .starts_with("the shell is not JSON")
        );
    }

    #[test]
    fn go_table_names_are_checked() {
        assert!(check_table("notification_outbox_messages").is_ok());
        assert!(check_table("x; DROP TABLE y").is_err());
        assert!(check_table("").is_err());
        assert_eq!(
            GoRoute::convention("active-scheduler"),
            "active_scheduler_outbox_messages"
        );
    }
}
