//! Services that relay from PostgreSQL's write-ahead log ([`OutboxBuilder::wal`]).
//!
//! The writer's transaction emits each event as a transactional logical decoding message
//! (`pg_logical_emit_message(true, 'outbox:<table>', event)`) instead of inserting a row: no
//! row, no claim, no status update, no dead tuple. The service's replication slot (made by
//! [`Outbox::migrate`], so that it exists before the first event) keeps every message from its
//! confirmed position on; a relay reads the slot without consuming it
//! (`pg_logical_slot_peek_binary_changes`, the `pgoutput` plugin with messages on), publishes
//! in commit order, and advances the slot (`pg_replication_slot_advance`) only past what the
//! broker acknowledged. One relay holds a slot at a time (an advisory lock on the connection
//! that reads it).
//!
//! The service's table stays: it keeps the events the relay could not publish (dead rows,
//! which `outbox dead` lists and replays), and replayed rows are published from it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Arg, Backend, Error, Outbox, OutboxBuilder, OutboxRow, Prepared, Status};

/// A position in the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `X/Y` text form.
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some(Lsn((hi << 32) | lo))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// One message read from a slot.
#[derive(Debug, Clone)]
pub enum WalItem {
    /// An event of the service, as the row it would have been (its `id` is the message's
    /// position, the envelope's `outbox_id`).
    Event(Box<OutboxRow>),
    /// A message with the service's prefix that is not an event this version can read.
    Malformed {
        /// The message's position.
        lsn: Lsn,
        /// Its `event_id`, when it is a JSON object with one (its dead row keeps it).
        event_id: Option<String>,
        /// Its content, as text (invalid UTF-8 replaced).
        content: String,
        /// Why it could not be read.
        error: String,
    },
}

/// What one read of a slot returned.
#[derive(Debug, Clone, Default)]
pub struct WalBatch {
    /// The service's messages in commit order, each with the commit position of its
    /// transaction: advancing the slot there confirms the message and the whole transaction.
    pub items: Vec<(WalItem, Lsn)>,
    /// The last commit position read (transactions with no message of the service included):
    /// advancing there confirms the whole read.
    pub end: Option<Lsn>,
    /// How many decoded changes the read returned.
    pub changes: usize,
}

/// The event as it travels in the write-ahead log.
#[derive(Serialize)]
struct WalOut<'a> {
    event_id: &'a str,
    event_type: &'a str,
    event_version: u32,
    topic: &'a str,
    message_key: Option<&'a str>,
    aggregate_id: Option<&'a str>,
    headers: &'a str,
    created_at: i64,
    max_attempts: i32,
    payload: &'a RawValue,
}

#[derive(Deserialize)]
struct WalIn {
    event_id: String,
    event_type: String,
    event_version: i32,
    topic: String,
    message_key: Option<String>,
    aggregate_id: Option<String>,
    headers: String,
    created_at: i64,
    max_attempts: i32,
    payload: Box<RawValue>,
}

/// The message prefix of the events of the service whose table is `table`: the table, not the
/// service, since every slot of the database decodes every message, and two outboxes in one
/// database (two prefixes of the same services, say) each have their own tables.
pub(super) fn prefix(table: &str) -> String {
    format!("outbox:{table}")
}

/// The replication slot of the service whose table is `table`: `outbox_<table>`, cut to
/// PostgreSQL's 63 characters with a hash of the whole name when longer.
pub(super) fn slot_name(table: &str) -> String {
    let name = format!("outbox_{table}");
    if name.len() <= 63 {
        return name;
    }
    let hash = super::queries::fnv1a(name.as_bytes());
    format!("{}_{hash:016x}", &name[..46])
}

/// The service's events among a slot's decoded changes, whole transactions in commit order:
/// what a read through the SQL interface ([`decode`]) and a stream
/// ([`WalStream`](super::WalStream)) both assemble.
#[derive(Debug)]
pub(super) struct Assembly {
    service: String,
    prefix: String,
    /// The service's events of every transaction received whole, in commit order, each with
    /// its transaction's commit position: confirming there confirms the event and the whole
    /// transaction.
    pub(super) ready: std::collections::VecDeque<(WalItem, Lsn)>,
    /// A position everything before which was received.
    pub(super) end: Option<Lsn>,
    /// The events of the transaction being received.
    open: Vec<WalItem>,
    in_txn: bool,
}

impl Assembly {
    /// For the messages of `prefix` ([`Outbox::wal_prefix`]).
    pub(super) fn new(service: &str, prefix: String) -> Assembly {
        Assembly {
            service: service.to_owned(),
            prefix,
            ready: std::collections::VecDeque::new(),
            end: None,
            open: Vec::new(),
            in_txn: false,
        }
    }

    /// A transaction begins (`B`).
    pub(super) fn begin(&mut self) {
        self.in_txn = true;
        self.open.clear();
    }

    /// A message (`M`) at position `at`, `id` its own position (the event's id). Outside a
    /// transaction (a relay's heartbeat, say) it is its own commit.
    pub(super) fn message(&mut self, id: Lsn, at: Lsn, prefix: &[u8], content: &[u8]) {
        if !self.in_txn {
            self.reached(at);
        }
        if prefix != self.prefix.as_bytes() {
            return;
        }
        let item = read_event(&self.service, id, content);
        if self.in_txn {
            self.open.push(item);
        } else {
            self.ready.push_back((item, at));
        }
    }

    /// The transaction commits (`C`), its commit ending at `at`.
    pub(super) fn commit(&mut self, at: Lsn) {
        self.ready
            .extend(self.open.drain(..).map(|item| (item, at)));
        self.reached(at);
        self.in_txn = false;
    }

    /// Everything before `at` was received.
    pub(super) fn reached(&mut self, at: Lsn) {
        self.end = self.end.max(Some(at));
    }

    /// A stream's sender is at `at`: every transaction that committed before it was sent, so
    /// between transactions everything before it was received.
    #[cfg(feature = "postgres")]
    pub(super) fn sender_at(&mut self, at: Lsn) {
        if !self.in_txn {
            self.reached(at);
        }
    }
}

/// Reads the `pgoutput` changes of one slot read: begin (`B`), message (`M`), commit (`C`);
/// relation changes cannot appear (the publication has no table) and are skipped.
fn decode(service: &str, want: &str, rows: Vec<(String, Vec<u8>)>) -> Result<WalBatch, Error> {
    let changes = rows.len();
    let mut got = Assembly::new(service, want.to_owned());
    for (lsn, data) in rows {
        let at = Lsn::parse(&lsn).ok_or_else(|| bad(format!("position `{lsn}`")))?;
        match data.first() {
            Some(b'B') => got.begin(),
            Some(b'C') => got.commit(at),
            Some(b'M') => {
                let (message_lsn, prefix, content) = message(&data[1..])
                    .ok_or_else(|| bad(format!("a message at {lsn} is truncated")))?;
                got.message(Lsn(message_lsn), at, prefix, content);
            }
            _ => {}
        }
    }
    Ok(WalBatch {
        items: got.ready.into(),
        end: got.end,
        changes,
    })
}

fn bad(what: String) -> Error {
    Error::Database(sqlx::Error::Protocol(format!(
        "unreadable logical decoding output: {what}"
    )))
}

/// A `pgoutput` message (protocol 1, after its `M`): flags, position, prefix, content.
fn message(body: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let (_flags, rest) = body.split_first()?;
    let lsn = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let rest = &rest[8..];
    let nul = rest.iter().position(|&b| b == 0)?;
    let (prefix, rest) = (&rest[..nul], &rest[nul + 1..]);
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let content = rest.get(4..4 + len)?;
    Some((lsn, prefix, content))
}

fn read_event(service: &str, lsn: Lsn, content: &[u8]) -> WalItem {
    let malformed = |error: String| WalItem::Malformed {
        lsn,
        event_id: serde_json::from_slice::<serde_json::Value>(content)
            .ok()
            .and_then(|v| v.get("event_id")?.as_str().map(str::to_owned))
            // The table's event ids are UUIDs.
            .filter(|id| id.len() <= 36),
        content: String::from_utf8_lossy(content).into_owned(),
        error,
    };
    let event: WalIn = match serde_json::from_slice(content) {
        Ok(e) => e,
        Err(e) => return malformed(format!("the message is not an outbox event: {e}")),
    };
    WalItem::Event(Box::new(OutboxRow {
        id: i64::try_from(lsn.0).unwrap_or(i64::MAX),
        event_id: event.event_id,
        event_type: event.event_type,
        event_version: event.event_version,
        service: service.to_owned(),
        topic: event.topic,
        message_key: event.message_key,
        aggregate_id: event.aggregate_id,
        // The text serde_json read, kept: no copy.
        payload: Box::<str>::from(event.payload).into_string(),
        headers: event.headers,
        status: Status::Sending,
        attempts: 0,
        max_attempts: event.max_attempts,
        next_attempt_at: None,
        lease_owner: None,
        lease_until: None,
        last_error: None,
        dead_reason: None,
        published_at: None,
        consumed_at: None,
        created_at: event.created_at,
        updated_at: event.created_at,
    }))
}

/// What the server says of a slot ([`Outbox::wal_slot_state`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    /// How far it is confirmed.
    pub confirmed: Option<Lsn>,
    /// Whether a replication connection streams it.
    pub streamed: bool,
    /// Whether PostgreSQL invalidated it (`wal_status` `lost`): it held more WAL than
    /// `max_slot_wal_keep_size` allows, and can no longer be read.
    pub lost: bool,
}

/// Where a relay's replication connection goes ([`Backend::replication_target`]).
#[doc(hidden)]
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicationTarget {
    /// The server's host name or address, or the directory of its Unix socket.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The user, which needs the `REPLICATION` attribute.
    pub user: String,
    /// Its password, when the server asks for one.
    pub password: Option<String>,
    /// The database whose slots are read.
    pub database: String,
    /// Whether connections must use TLS (`sslmode` `require` or stricter).
    pub tls: bool,
}

impl std::fmt::Debug for ReplicationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("database", &self.database)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A slot's lag: what `outbox status` and the `outbox_wal_lag_*` gauges show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalLag {
    /// The service.
    pub service: String,
    /// Its slot.
    pub slot: String,
    /// Bytes of WAL from the slot's confirmed position to the server's current one: what the
    /// slot keeps the server from recycling. `None` when the slot does not exist.
    pub bytes: Option<i64>,
    /// How long the oldest event not yet published has waited, in ms (`Some(0)` when none
    /// waits); `None` when it could not be told.
    pub age_ms: Option<i64>,
    /// Whether a relay holds the slot now.
    pub relay_active: bool,
    /// Whether PostgreSQL invalidated the slot ([`Error::WalSlotLost`]): the relay cannot read
    /// it, and stops; `age_ms` is then `None`.
    pub lost: bool,
}

impl<DB: Backend> OutboxBuilder<DB> {
    /// Relays `service` from the write-ahead log (PostgreSQL): [`Outbox::enqueue`] emits its
    /// events into the log in the caller's transaction instead of inserting rows, and the
    /// relay reads them from the service's replication slot in commit order. Its consumers
    /// must use [`Dedupe::Inbox`](crate::consumer::Dedupe::Inbox): the events have no row to
    /// mark. Needs `wal_level = logical`; [`Outbox::migrate`] makes the slot. Refused on
    /// MySQL and SQLite, for a service the catalog does not have, and for a Go-routed one.
    pub fn wal(mut self, service: &str) -> Result<Self, Error> {
        if self.catalog.service(service).is_none() {
            return Err(Error::UnknownService {
                service: service.to_owned(),
            });
        }
        if !DB::QUERIES.contains("-- name: wal_emit") {
            return Err(Error::WalUnsupported { backend: DB::NAME });
        }
        if self.go.contains_key(service) {
            return Err(Error::WalAndGo {
                service: service.to_owned(),
            });
        }
        self.wal.insert(service.to_owned());
        Ok(self)
    }
}

impl<DB: Backend> Outbox<DB> {
    /// Whether `service` relays from the write-ahead log.
    pub fn is_wal(&self, service: &str) -> bool {
        self.inner.wal.contains(service)
    }

    /// The services that relay from the write-ahead log.
    pub fn wal_services(&self) -> impl Iterator<Item = &str> {
        self.inner.wal.iter().map(String::as_str)
    }

    /// The replication slot of a write-ahead-log service.
    pub fn wal_slot(&self, service: &str) -> Result<String, Error> {
        Ok(slot_name(&self.table(service)?.route.table))
    }

    /// The prefix of `service`'s messages in the write-ahead log (`outbox:<table>`).
    pub fn wal_prefix(&self, service: &str) -> Result<String, Error> {
        Ok(prefix(&self.table(service)?.route.table))
    }

    /// Refuses a server whose `wal_level` is not `logical` ([`Error::WalLevel`], with the
    /// fix), naming `service`.
    pub async fn check_wal_level(
        &self,
        conn: &mut DB::Connection,
        service: &str,
    ) -> Result<(), Error> {
        let level = DB::fetch_pairs(conn, self.inbox_sql("wal_level"), Vec::new())
            .await?
            .into_iter()
            .next()
            .map(|(l, _)| l)
            .unwrap_or_default();
        if level == "logical" {
            return Ok(());
        }
        Err(Error::WalLevel {
            service: service.to_owned(),
            found: level,
        })
    }

    /// Refuses to relay the write-ahead-log services where their events cannot be read: a server
    /// whose `wal_level` is not `logical` ([`Error::WalLevel`]), a service whose slot does not
    /// exist ([`Error::WalSlotMissing`]).
    pub async fn check_wal(&self, conn: &mut DB::Connection) -> Result<(), Error> {
        // The level is the server's: asked once, naming the first service.
        if let Some(first) = self.inner.wal.iter().next() {
            self.check_wal_level(conn, first).await?;
        }
        for service in &self.inner.wal {
            let slot = self.wal_slot(service)?;
            if !self.wal_slot_exists(conn, &slot).await? {
                return Err(Error::WalSlotMissing {
                    service: service.clone(),
                    slot,
                });
            }
        }
        Ok(())
    }

    /// Makes what the write-ahead-log services need: the publication and each service's slot
    /// (from now on, the slot keeps every event written), by the statements of
    /// [`Outbox::migration_sql`]. Run outside a transaction.
    pub(super) async fn migrate_wal(&self, conn: &mut DB::Connection) -> Result<(), Error> {
        let Some(first) = self.inner.wal.iter().next() else {
            return Ok(());
        };
        self.check_wal_level(conn, first).await?;
        for (slot, sql) in self.wal_statements() {
            match DB::execute(conn, &sql, Vec::new()).await {
                Ok(_) => {}
                // A slot made meanwhile by another migration.
                Err(e)
                    if match &slot {
                        Some(slot) => self.wal_slot_exists(conn, slot).await.unwrap_or(false),
                        None => false,
                    } =>
                {
                    tracing::debug!(?slot, error = %e, "slot made by another migration");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// What [`Outbox::migrate`] makes for the write-ahead-log services, as statements for
    /// [`Outbox::migration_sql`]: the table of what each relay saw, the publication, and each
    /// service's slot where this database has none of its name. Empty without such services.
    pub(super) fn wal_migration_sql(&self) -> Vec<String> {
        self.wal_statements()
            .into_iter()
            .map(|(_, sql)| sql)
            .collect()
    }

    /// [`Outbox::wal_migration_sql`], each statement with the slot it makes, if any.
    fn wal_statements(&self) -> Vec<(Option<String>, String)> {
        if self.inner.wal.is_empty() {
            return Vec::new();
        }
        let mut out = vec![
            (None, self.inbox_sql("create_wal_slots").to_owned()),
            (None, self.inbox_sql("wal_publication").to_owned()),
        ];
        // Slot names are made of a checked table name: `[a-z_][a-z0-9_]*`.
        for slot in self.inner.wal.iter().filter_map(|s| self.wal_slot(s).ok()) {
            let sql = self.inbox_sql("wal_create_slot").replace("{slot}", &slot);
            out.push((Some(slot), sql));
        }
        out
    }

    async fn wal_slot_exists(&self, conn: &mut DB::Connection, slot: &str) -> Result<bool, Error> {
        let n = DB::fetch_ints(
            conn,
            self.inbox_sql("wal_slot_exists"),
            vec![Arg::Str(slot.to_owned())],
        )
        .await?;
        Ok(n.first().copied().flatten().unwrap_or(0) > 0)
    }

    /// Emits a prepared event into the write-ahead log, in the caller's transaction.
    pub(super) async fn emit(&self, conn: &mut DB::Connection, p: &Prepared) -> Result<(), Error> {
        let (sql, args) = self.emit_args(p)?;
        DB::execute(conn, sql, args).await?;
        Ok(())
    }

    /// `wal_emit` and its arguments: the prefix and the event as it travels in the log.
    pub(super) fn emit_args(&self, p: &Prepared) -> Result<(&str, Vec<Arg>), Error> {
        let table = self.table(p.service)?;
        let payload: &RawValue = serde_json::from_str(&p.payload).map_err(Error::Encode)?;
        let content = serde_json::to_string(&WalOut {
            event_id: &p.event_id,
            event_type: p.event_type,
            event_version: p.version,
            topic: &p.topic,
            message_key: p.key.as_deref(),
            aggregate_id: p.aggregate.as_deref(),
            headers: &p.headers,
            created_at: self.now_ms(),
            max_attempts: self.inner.config.max_attempts,
            payload,
        })
        .map_err(Error::Encode)?;
        Ok((
            table.get("wal_emit"),
            vec![Arg::Str(prefix(&table.route.table)), Arg::Str(content)],
        ))
    }

    /// Takes `service`'s slot for this connection (a session advisory lock, held until
    /// [`Outbox::wal_release`] or the connection closes); false when another relay has it.
    /// Fails with [`Error::WalSlotMissing`] when the slot does not exist.
    #[doc(hidden)]
    pub async fn wal_acquire(
        &self,
        conn: &mut DB::Connection,
        service: &str,
    ) -> Result<bool, Error> {
        let slot = self.wal_slot(service)?;
        if !self.wal_slot_exists(conn, &slot).await? {
            return Err(Error::WalSlotMissing {
                service: service.to_owned(),
                slot,
            });
        }
        let got = DB::fetch_ints(conn, self.inbox_sql("wal_lock"), vec![Arg::Str(slot)]).await?;
        Ok(got.first().copied().flatten() == Some(1))
    }

    /// Gives back the slot [`Outbox::wal_acquire`] took.
    #[doc(hidden)]
    pub async fn wal_release(&self, conn: &mut DB::Connection, service: &str) -> Result<(), Error> {
        let slot = self.wal_slot(service)?;
        DB::fetch_ints(conn, self.inbox_sql("wal_unlock"), vec![Arg::Str(slot)]).await?;
        Ok(())
    }

    /// Reads `service`'s next messages from its slot without consuming them: whole
    /// transactions, stopping after the one that brings the decoded changes to `changes`.
    #[doc(hidden)]
    pub async fn wal_peek(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        changes: usize,
    ) -> Result<WalBatch, Error> {
        let slot = self.wal_slot(service)?;
        let rows = DB::fetch_bytes(
            conn,
            self.inbox_sql("wal_peek"),
            vec![
                Arg::Str(slot),
                Arg::I64(i64::try_from(changes).unwrap_or(i64::MAX)),
            ],
        )
        .await?;
        decode(service, &self.wal_prefix(service)?, rows)
    }

    /// Writes a message outside any transaction (`outbox-heartbeat`, no service's prefix): the
    /// next read of an idle slot returns its position, and advancing there lets the slot
    /// release the WAL that other writers of the database produced meanwhile.
    #[doc(hidden)]
    pub async fn wal_heartbeat(&self, conn: &mut DB::Connection) -> Result<(), Error> {
        DB::execute(conn, self.inbox_sql("wal_heartbeat"), Vec::new()).await?;
        Ok(())
    }

    /// Confirms `service`'s slot up to `lsn` (a commit position a read returned): the server
    /// may recycle the WAL before it, and the next read starts after it.
    #[doc(hidden)]
    pub async fn wal_advance(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        lsn: Lsn,
    ) -> Result<(), Error> {
        let slot = self.wal_slot(service)?;
        DB::execute(
            conn,
            self.inbox_sql("wal_advance"),
            vec![Arg::Str(slot), Arg::Str(lsn.to_string())],
        )
        .await?;
        Ok(())
    }

    /// How far `service`'s slot is confirmed, and whether a replication connection streams
    /// it; `None` without the slot.
    #[doc(hidden)]
    pub async fn wal_slot_state(
        &self,
        conn: &mut DB::Connection,
        service: &str,
    ) -> Result<Option<SlotState>, Error> {
        let slot = self.wal_slot(service)?;
        let got =
            DB::fetch_pairs(conn, self.inbox_sql("wal_slot_state"), vec![Arg::Str(slot)]).await?;
        Ok(got.first().map(|(lsn, flags)| SlotState {
            confirmed: Lsn::parse(lsn),
            streamed: flags & 1 != 0,
            lost: flags & 2 != 0,
        }))
    }

    /// Keeps a write-ahead-log event the relay must not (or could not) publish as a dead row of
    /// its service's table; false when it was already there.
    #[doc(hidden)]
    pub async fn wal_dead(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        item: &WalItem,
        attempts: i32,
        reason: &str,
        error: &str,
    ) -> Result<bool, Error> {
        let table = self.table(service)?;
        let now = self.now_ms();
        let args = match item {
            WalItem::Event(row) => vec![
                Arg::Str(row.event_id.clone()),
                Arg::Str(row.event_type.clone()),
                Arg::I64(i64::from(row.event_version)),
                Arg::Str(service.to_owned()),
                Arg::Str(row.topic.clone()),
                Arg::OptStr(row.message_key.clone()),
                Arg::OptStr(row.aggregate_id.clone()),
                Arg::Str(row.payload.clone()),
                Arg::Str(row.headers.clone()),
                Arg::I64(i64::from(attempts)),
                Arg::I64(i64::from(row.max_attempts)),
                Arg::Str(reason.to_owned()),
                Arg::Str(self.error_text(error)),
                Arg::I64(row.created_at),
                Arg::I64(now),
            ],
            WalItem::Malformed {
                lsn,
                event_id,
                content,
                error: why,
            } => vec![
                // Its own id, or the same id on every read of the message: from its slot and
                // position.
                Arg::Str(match event_id {
                    Some(id) => id.clone(),
                    None => uuid::Uuid::new_v5(
                        &uuid::Uuid::NAMESPACE_OID,
                        format!("{}:{lsn}", self.wal_slot(service)?).as_bytes(),
                    )
                    .to_string(),
                }),
                Arg::Str("unknown".to_owned()),
                Arg::I64(0),
                Arg::Str(service.to_owned()),
                Arg::Str(table.route.topic.clone()),
                Arg::OptStr(None),
                Arg::OptStr(None),
                Arg::Str(content.clone()),
                Arg::Str("{}".to_owned()),
                Arg::I64(i64::from(attempts)),
                Arg::I64(i64::from(self.inner.config.max_attempts)),
                Arg::Str(reason.to_owned()),
                Arg::Str(self.error_text(&format!("{error}: {why}"))),
                Arg::I64(now),
                Arg::I64(now),
            ],
        };
        Ok(DB::execute(conn, table.get("wal_dead"), args).await? > 0)
    }

    /// Records what the relay of `service` last saw: the creation time of the oldest event it
    /// has not published (`None`: it published everything it read).
    #[doc(hidden)]
    pub async fn wal_seen(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        oldest_unpublished: Option<i64>,
    ) -> Result<(), Error> {
        let args = vec![
            Arg::Str(self.wal_slot(service)?),
            Arg::Str(service.to_owned()),
            Arg::OptI64(oldest_unpublished),
            Arg::I64(self.now_ms()),
        ];
        DB::execute(conn, self.inbox_sql("wal_seen"), args).await?;
        Ok(())
    }

    /// The lag of `service`'s slot: its bytes, and the age of its oldest unpublished event —
    /// read from the slot when no relay holds it, else as the relay last recorded it.
    pub async fn wal_lag(&self, conn: &mut DB::Connection, service: &str) -> Result<WalLag, Error> {
        let slot = self.wal_slot(service)?;
        let mut lag = WalLag {
            service: service.to_owned(),
            slot: slot.clone(),
            bytes: None,
            age_ms: None,
            relay_active: false,
            lost: false,
        };
        let Some((bytes, lost)) = self.wal_held(conn, &slot).await? else {
            return Ok(lag);
        };
        (lag.bytes, lag.lost) = (Some(bytes), lost);
        if lost {
            // Reading it would only fail.
            return Ok(lag);
        }
        let now = self.now_ms();
        if self.wal_acquire(conn, service).await? {
            // A few changes: a heartbeat may come before the first event.
            let read = self.wal_peek(conn, service, 16).await;
            self.wal_release(conn, service).await?;
            lag.age_ms = Some(match read?.items.first() {
                Some((WalItem::Event(row), _)) => now.saturating_sub(row.created_at).max(0),
                _ => 0,
            });
        } else {
            lag.relay_active = true;
            let seen = DB::fetch_ints(
                conn,
                self.inbox_sql("wal_last_seen"),
                vec![Arg::Str(slot.clone())],
            )
            .await?;
            lag.age_ms = seen
                .first()
                .map(|t| t.map_or(0, |t| now.saturating_sub(t).max(0)));
        }
        Ok(lag)
    }

    /// The bytes of WAL `slot` holds back, and whether the server invalidated it (see
    /// [`SlotState::lost`]); `None` without the slot.
    #[doc(hidden)]
    pub async fn wal_held(
        &self,
        conn: &mut DB::Connection,
        slot: &str,
    ) -> Result<Option<(i64, bool)>, Error> {
        let got = DB::fetch_pairs(
            conn,
            self.inbox_sql("wal_lag"),
            vec![Arg::Str(slot.to_owned())],
        )
        .await?;
        Ok(got
            .first()
            .map(|(status, bytes)| (*bytes, status == "lost")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_and_print_as_postgresql_does() {
        assert_eq!(Lsn::parse("0/16B3748"), Some(Lsn(0x16B_3748)));
        assert_eq!(Lsn::parse("1A/0"), Some(Lsn(0x1A_0000_0000)));
        assert_eq!(Lsn(0x1A_0016_B374).to_string(), "1A/16B374");
        assert!(Lsn::parse("16B3748").is_none());
        assert!(Lsn::parse("x/1").is_none());
        assert!(Lsn(0x1_0000_0000) > Lsn(0xFFFF_FFFF));
    }

    #[test]
    fn slot_names_fit_postgresql() {
        assert_eq!(slot_name("orders_outbox"), "outbox_orders_outbox");
        let long = "t".repeat(63);
        let slot = slot_name(&long);
        assert_eq!(slot.len(), 63);
        assert_ne!(slot, slot_name(&"t".repeat(62)));
    }

    #[test]
    fn a_server_that_cannot_decode_its_log_is_refused_with_the_fix() {
        let e = Error::WalLevel {
            service: "task".into(),
            found: "replica".into(),
        }
        .to_string();
        assert!(e.contains("wal_level = replica"), "{e}");
        assert!(e.contains("ALTER SYSTEM SET wal_level = logical;"), "{e}");
        assert!(e.contains("restart PostgreSQL"), "{e}");
    }

    fn change(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(body);
        v
    }

    /// A message outside any transaction.
    fn msg_free(prefix: &str, content: &[u8]) -> Vec<u8> {
        let mut m = msg(prefix, content);
        m[1] = 0;
        m
    }

    fn msg(prefix: &str, content: &[u8]) -> Vec<u8> {
        let mut v = vec![1];
        v.extend_from_slice(&0x42_u64.to_be_bytes());
        v.extend_from_slice(prefix.as_bytes());
        v.push(0);
        v.extend_from_slice(&u32::try_from(content.len()).unwrap().to_be_bytes());
        v.extend_from_slice(content);
        change(b'M', &v)
    }

    #[test]
    fn a_read_keeps_the_services_messages_with_their_commit_and_flags_bad_ones() {
        let event = br#"{"event_id":"e1","event_type":"t","event_version":2,"topic":"x","message_key":"k","aggregate_id":null,"headers":"{}","created_at":5,"max_attempts":20,"payload":{"a":[1,2]}}"#;
        let rows = vec![
            ("0/10".to_owned(), change(b'B', &[0; 20])),
            ("0/11".to_owned(), msg("outbox:svc", event)),
            ("0/12".to_owned(), msg("outbox:other", event)),
            ("0/13".to_owned(), msg("outbox:svc", b"not json")),
            ("0/20".to_owned(), change(b'C', &[0; 25])),
            ("0/30".to_owned(), change(b'B', &[0; 20])),
            ("0/31".to_owned(), msg("outbox:other", event)),
            ("0/40".to_owned(), change(b'C', &[0; 25])),
        ];
        let batch = decode("svc", "outbox:svc", rows).unwrap();
        assert_eq!(batch.changes, 8);
        assert_eq!(batch.end, Some(Lsn(0x40)));
        assert_eq!(batch.items.len(), 2);
        match &batch.items[0] {
            (WalItem::Event(row), commit) => {
                assert_eq!(*commit, Lsn(0x20));
                assert_eq!(row.event_id, "e1");
                assert_eq!(row.id, 0x42);
                assert_eq!(row.payload, r#"{"a":[1,2]}"#);
                assert_eq!(row.message_key.as_deref(), Some("k"));
                assert_eq!(row.service, "svc");
            }
            other => panic!("not an event: {other:?}"),
        }
        assert!(matches!(
            &batch.items[1],
            (WalItem::Malformed { content, event_id: None, .. }, Lsn(0x20)) if content == "not json"
        ));
        // A JSON object that is not an event keeps its event id.
        let odd = decode(
            "svc",
            "outbox:svc",
            vec![(
                "0/60".to_owned(),
                msg_free("outbox:svc", br#"{"event_id":"e9","payload":1}"#),
            )],
        )
        .unwrap();
        assert!(matches!(
            &odd.items[0],
            (WalItem::Malformed { event_id: Some(id), .. }, _) if id == "e9"
        ));
        // A message outside a transaction, of any prefix, ends what a read confirms.
        let beat = decode(
            "svc",
            "outbox:svc",
            vec![("0/50".to_owned(), msg("outbox-heartbeat", b""))],
        )
        .unwrap();
        assert_eq!(beat.end, Some(Lsn(0x50)));
        assert!(beat.items.is_empty());
        // A truncated message is an error, not a skipped event.
        let mut cut = msg("outbox:svc", event);
        cut.truncate(30);
        assert!(decode("svc", "outbox:svc", vec![("0/1".to_owned(), cut)]).is_err());
    }
}
