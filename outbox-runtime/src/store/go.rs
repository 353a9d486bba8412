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
}

impl GoRoute {
    /// The route of a service whose Go table is `table`.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            version: VersionFormat::Number,
            max_retry: 20,
        }
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
}

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
    let mut end = reason.len().min(2000);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
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
