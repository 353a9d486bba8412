//! The ledger: what the writers did to each event (committed, rolled back, failed, or in doubt
//! because the commit's answer was lost), what each event must end as, and the check against
//! the database once the system is quiet.

use std::collections::{HashMap, HashSet};
use std::fmt;

use outbox_runtime::sqlx::Pool;
use outbox_runtime::store::{Arg, Backend, OutboxRow};
use outbox_runtime::{Outbox, Status};

use crate::BoxError;
use crate::world::Names;

/// Poison: what a consumer (or the relay) must dead-letter, never apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Poison {
    /// The stored payload is not JSON: the relay cannot build an envelope.
    MalformedJson,
    /// A version the service does not accept.
    UnknownVersion,
    /// JSON of the right shape that breaks a validation rule.
    InvalidPayload,
    /// JSON that does not fit the payload's shape.
    Undecodable,
    /// A valid event whose handler fails every time.
    AlwaysFails,
}

impl Poison {
    /// The relay dead-letters it (the consumer never sees it): its row is dead wherever the
    /// consumer keeps its state.
    pub(crate) fn relay_side(self) -> bool {
        self == Poison::MalformedJson
    }

    pub(crate) const ALL: [Poison; 5] = [
        Poison::MalformedJson,
        Poison::UnknownVersion,
        Poison::InvalidPayload,
        Poison::Undecodable,
        Poison::AlwaysFails,
    ];

    /// The dead reason the row must end with.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Poison::MalformedJson => "malformed_payload",
            Poison::UnknownVersion => "unsupported_version",
            Poison::InvalidPayload => "invalid_payload",
            Poison::Undecodable => "decode_error",
            Poison::AlwaysFails => "max_attempts",
        }
    }
}

/// What the writer's transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The commit succeeded.
    Committed,
    /// The writer rolled it back on purpose.
    RolledBack,
    /// A statement before the commit failed; the transaction never committed.
    Failed,
    /// The commit was sent and its answer lost (the database went away): resolved at the end
    /// by whether the row exists.
    InDoubt,
}

/// One write.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    /// Known once the event was stored in the transaction.
    pub(crate) event_id: Option<String>,
    pub(crate) poison: Option<Poison>,
    pub(crate) fate: Fate,
}

/// The check of one scenario run.
#[derive(Debug, Default, Clone)]
pub(crate) struct Verdict {
    /// Committed events (in-doubt ones whose row exists included).
    pub(crate) events: u64,
    /// Of which poison.
    pub(crate) poison: u64,
    pub(crate) rolled_back: u64,
    pub(crate) failed: u64,
    pub(crate) in_doubt: u64,
    /// Committed healthy events with no effect (or no row), the broker's stalls aside.
    pub(crate) lost: u64,
    /// Of the events with no effect, those published to a partition the group's consumers
    /// stopped reading (its committed offset behind the log's end when the run ended): the
    /// broker's stall, not a loss of ours (see [`Verdict::blame_stalls`]).
    pub(crate) stalled: u64,
    /// The message keys of the events with no effect whose row is published.
    pub(crate) unread_keys: Vec<String>,
    /// Effects beyond the first, summed over events.
    pub(crate) duplicate_effects: u64,
    /// Dead rows.
    pub(crate) dead: u64,
    /// Committed poison events: the rows that must be dead.
    pub(crate) expected_dead: u64,
    /// Poison rows dead with another reason than expected, or not dead.
    pub(crate) wrong_reason: u64,
    /// Poison events that had an effect.
    pub(crate) poison_applied: u64,
    /// Events of transactions that did not commit that have a row or an effect.
    pub(crate) uncommitted_visible: u64,
    /// Business row and event disagree (one committed without the other).
    pub(crate) atomicity: u64,
    /// Rows or effects of no event in the ledger.
    pub(crate) strays: u64,
    /// Rows neither consumed nor dead.
    pub(crate) not_final: u64,
    /// Examples of what went wrong, for the report.
    pub(crate) problems: Vec<String>,
}

impl Verdict {
    /// Moves the lost events published to a partition whose group offset is behind the log's
    /// end (`behind(key)`) from `lost` to `stalled`.
    pub(crate) fn blame_stalls(&mut self, behind: impl Fn(&str) -> bool) {
        let stalled = self.unread_keys.iter().filter(|k| behind(k)).count() as u64;
        self.stalled += stalled;
        self.lost -= stalled.min(self.lost);
    }

    pub(crate) fn ok(&self) -> bool {
        self.stalled == 0
            && self.lost == 0
            && self.duplicate_effects == 0
            && self.dead == self.expected_dead
            && self.wrong_reason == 0
            && self.poison_applied == 0
            && self.uncommitted_visible == 0
            && self.atomicity == 0
            && self.strays == 0
            && self.not_final == 0
    }

    fn problem(&mut self, p: impl FnOnce() -> String) {
        if self.problems.len() < 8 {
            self.problems.push(p());
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "events={} lost={} broker_stalled={} duplicate_effects={} dead={} expected_dead={} rolled_back={} \
             failed={} in_doubt={} wrong_reason={} poison_applied={} uncommitted_visible={} \
             atomicity={} strays={} not_final={}",
            self.events,
            self.lost,
            self.stalled,
            self.duplicate_effects,
            self.dead,
            self.expected_dead,
            self.rolled_back,
            self.failed,
            self.in_doubt,
            self.wrong_reason,
            self.poison_applied,
            self.uncommitted_visible,
            self.atomicity,
            self.strays,
            self.not_final
        )
    }
}

/// The outbox columns in `OutboxRow` field order, for `Backend::fetch_rows`.
const COLUMNS: &str = "id, event_id, event_type, event_version, service_name, topic, \
    message_key, aggregate_id, payload, headers, status, attempts, max_attempts, \
    next_attempt_at, lease_owner, lease_until, last_error, dead_reason, published_at, \
    consumed_at, created_at, updated_at";

/// Where the consumers keep their state.
pub(crate) enum Side<'a, C: Backend> {
    /// In the producer's database: they mark its rows consumed, and the effects are there.
    Shared(&'a Pool<C>),
    /// In a database of their own (the inbox, for consumer group `group`): the producer's rows
    /// end `published`, the effects and dead letters are there.
    Own {
        pool: &'a Pool<C>,
        outbox: &'a Outbox<C>,
        group: &'a str,
    },
}

impl<C: Backend> Clone for Side<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C: Backend> Copy for Side<'_, C> {}

impl<'a, C: Backend> Side<'a, C> {
    fn pool(&self) -> &'a Pool<C> {
        match self {
            Side::Shared(pool) | Side::Own { pool, .. } => pool,
        }
    }
}

fn first(v: Vec<Option<i64>>) -> i64 {
    v.into_iter().next().flatten().unwrap_or(0)
}

/// Events not settled yet, and effects so far: the quiet test. An event is settled when its
/// row is consumed or dead, or, with consumers in their own database, when its published row
/// has an effect or a dead letter there. With the write-ahead log (`wal`) an event has no row
/// but a dead one: every committed event (its business row) that is not dead in the table is
/// open until it has an effect or a dead letter.
pub(crate) async fn progress<DB: Backend, C: Backend>(
    pool: &Pool<DB>,
    side: Side<'_, C>,
    names: &Names,
    wal: bool,
) -> Result<(i64, i64), BoxError> {
    let mut conn = pool.acquire().await?;
    let final_states = match side {
        Side::Shared(_) => "'consumed', 'dead'",
        Side::Own { .. } => "'published', 'consumed', 'dead'",
    };
    let sql = format!(
        "SELECT COUNT(*) FROM {} WHERE status NOT IN ({final_states})",
        names.table
    );
    let mut open = first(DB::fetch_ints(&mut conn, &sql, Vec::new()).await?);
    // With their own database, a published row is open until it has an effect or a dead
    // letter there.
    let published = match side {
        Side::Shared(_) => 0,
        Side::Own { .. } if wal => {
            let sql = format!(
                "SELECT (SELECT COUNT(*) FROM {}) - (SELECT COUNT(*) FROM {} WHERE status = 'dead')",
                names.business, names.table
            );
            first(DB::fetch_ints(&mut conn, &sql, Vec::new()).await?)
        }
        Side::Own { .. } => {
            let sql = format!(
                "SELECT COUNT(*) FROM {} WHERE status = 'published'",
                names.table
            );
            first(DB::fetch_ints(&mut conn, &sql, Vec::new()).await?)
        }
    };
    drop(conn);
    let mut conn = side.pool().acquire().await?;
    let effects = format!("SELECT COUNT(*) FROM {}", names.effects);
    let effects = first(C::fetch_ints(&mut conn, &effects, Vec::new()).await?);
    if let Side::Own { group, .. } = side {
        let applied = format!("SELECT COUNT(DISTINCT event_id) FROM {}", names.effects);
        let applied = first(C::fetch_ints(&mut conn, &applied, Vec::new()).await?);
        let dead =
            C::dialect_sql("SELECT COUNT(*) FROM outbox_inbox_dead WHERE consumer_group = $1")
                .into_owned();
        let dead = first(C::fetch_ints(&mut conn, &dead, vec![Arg::Str(group.to_owned())]).await?);
        open += (published - applied - dead).max(0);
    }
    Ok((open, effects))
}

/// Checks the ledger against the tables.
/// With the write-ahead log (`wal`), a committed event has no row unless it went dead at the
/// relay.
pub(crate) async fn verify<DB: Backend, C: Backend>(
    pool: &Pool<DB>,
    side: Side<'_, C>,
    names: &Names,
    wal: bool,
    ledger: &[Entry],
) -> Result<Verdict, BoxError> {
    let mut conn = pool.acquire().await?;
    let rows: HashMap<String, OutboxRow> = DB::fetch_rows(
        &mut conn,
        &format!("SELECT {COLUMNS} FROM {}", names.table),
        Vec::new(),
    )
    .await?
    .into_iter()
    .map(|r| (r.event_id.clone(), r))
    .collect();
    let business: HashSet<i64> = DB::fetch_ints(
        &mut conn,
        &format!("SELECT seq FROM {}", names.business),
        Vec::new(),
    )
    .await?
    .into_iter()
    .flatten()
    .collect();
    drop(conn);
    let mut conn = side.pool().acquire().await?;
    let effects: HashMap<String, i64> = C::fetch_pairs(
        &mut conn,
        &format!(
            "SELECT event_id, COUNT(*) FROM {} GROUP BY event_id",
            names.effects
        ),
        Vec::new(),
    )
    .await?
    .into_iter()
    .collect();
    // With their own database, the consumers' dead letters: event id to reason.
    let letters: HashMap<String, String> = match side {
        Side::Shared(_) => HashMap::new(),
        Side::Own { outbox, group, .. } => {
            let mut letters = HashMap::new();
            let mut after = String::new();
            loop {
                let page = outbox
                    .list_inbox_dead(&mut conn, group, &after, 500)
                    .await?;
                let Some(last) = page.last() else { break };
                after = last.event_id.clone();
                letters.extend(page.into_iter().map(|d| (d.event_id, d.reason)));
            }
            letters
        }
    };
    drop(conn);
    let own = matches!(side, Side::Own { .. });

    let mut v = Verdict::default();
    let mut known: HashSet<&str> = HashSet::new();
    for e in ledger {
        let row = e.event_id.as_deref().and_then(|id| rows.get(id));
        let applied = e
            .event_id
            .as_deref()
            .and_then(|id| effects.get(id))
            .copied()
            .unwrap_or(0);
        if let Some(id) = e.event_id.as_deref() {
            known.insert(id);
        }
        let has_business = business.contains(&i64::try_from(e.seq).unwrap_or(i64::MAX));
        let committed = match e.fate {
            Fate::Committed => true,
            Fate::InDoubt => {
                v.in_doubt += 1;
                row.is_some() || has_business
            }
            Fate::RolledBack => {
                v.rolled_back += 1;
                false
            }
            Fate::Failed => {
                v.failed += 1;
                false
            }
        };
        if !committed {
            if row.is_some() || applied > 0 {
                v.uncommitted_visible += 1;
                v.problem(|| {
                    format!(
                        "seq {} ({:?}) did not commit, yet its event {:?} has a row: {}, effects: {applied}",
                        e.seq,
                        e.fate,
                        e.event_id,
                        row.is_some()
                    )
                });
            }
            if has_business {
                v.atomicity += 1;
                v.problem(|| format!("seq {} did not commit, yet its business row exists", e.seq));
            }
            continue;
        }
        v.events += 1;
        // With the write-ahead log, the event's row is the message in the log: only the
        // business row can be looked at here.
        if !has_business || (row.is_none() && !wal) {
            v.atomicity += 1;
            v.problem(|| {
                format!(
                    "seq {} committed: business row {}, outbox row {}",
                    e.seq,
                    has_business,
                    row.is_some()
                )
            });
        }
        match e.poison {
            None => {
                if applied == 0 {
                    v.lost += 1;
                    if let Some(r) = row.filter(|r| r.status == Status::Published) {
                        v.unread_keys
                            .push(r.message_key.clone().unwrap_or_default());
                    }
                    v.problem(|| {
                        format!(
                            "lost: seq {} event {:?} has no effect; row: {}",
                            e.seq,
                            e.event_id,
                            describe(row)
                        )
                    });
                } else if applied > 1 {
                    v.duplicate_effects += u64::try_from(applied - 1).unwrap_or(0);
                    v.problem(|| {
                        format!(
                            "duplicate: seq {} event {:?} applied {applied} times; row: {}",
                            e.seq,
                            e.event_id,
                            describe(row)
                        )
                    });
                }
            }
            Some(p) => {
                v.poison += 1;
                v.expected_dead += 1;
                if applied > 0 {
                    v.poison_applied += 1;
                    v.problem(|| format!("poison {p:?} seq {} was applied", e.seq));
                }
                let reason_ok = if own && !p.relay_side() && wal {
                    // Dead in the consumers' database; the producer has no row.
                    row.is_none()
                        && e.event_id
                            .as_deref()
                            .and_then(|id| letters.get(id))
                            .map(String::as_str)
                            == Some(p.reason())
                } else if own && !p.relay_side() {
                    // Dead in the consumers' database; the producer's row stays published.
                    row.is_some_and(|r| {
                        r.status == Status::Published
                            && letters.get(&r.event_id).map(String::as_str) == Some(p.reason())
                    })
                } else {
                    row.is_some_and(|r| {
                        r.status == Status::Dead && r.dead_reason.as_deref() == Some(p.reason())
                    })
                };
                if !reason_ok {
                    v.wrong_reason += 1;
                    v.problem(|| {
                        format!(
                            "poison {p:?} seq {} should be dead with `{}`; row: {}; dead letter: {:?}",
                            e.seq,
                            p.reason(),
                            describe(row),
                            e.event_id.as_deref().and_then(|id| letters.get(id))
                        )
                    });
                }
            }
        }
    }
    for (id, row) in &rows {
        if row.status == Status::Dead {
            v.dead += 1;
        }
        // With their own database, the consumers never mark the producer's rows: published is
        // where a delivered row ends.
        let settled = row.status.is_final() || own && row.status == Status::Published;
        if !settled {
            v.not_final += 1;
            v.problem(|| format!("not final: {}", describe(Some(row))));
        }
        if !known.contains(id.as_str()) {
            v.strays += 1;
            v.problem(|| format!("a row of no ledger entry: {}", describe(Some(row))));
        }
    }
    v.dead += u64::try_from(letters.len()).unwrap_or(0);
    for id in letters.keys() {
        if !known.contains(id.as_str()) {
            v.strays += 1;
            v.problem(|| format!("a dead letter of no ledger entry: event {id}"));
        }
    }
    for id in effects.keys() {
        if !known.contains(id.as_str()) {
            v.strays += 1;
            v.problem(|| format!("an effect of no ledger entry: event {id}"));
        }
    }
    Ok(v)
}

fn describe(row: Option<&OutboxRow>) -> String {
    match row {
        None => "none".to_owned(),
        Some(r) => format!(
            "id {} event {} status {} attempts {}/{} dead_reason {:?} last_error {:?}",
            r.id,
            r.event_id,
            r.status,
            r.attempts,
            r.max_attempts,
            r.dead_reason,
            r.last_error.as_deref().map(|e| crate::ledger::clip(e, 160))
        ),
    }
}

pub(crate) fn clip(s: &str, max: usize) -> &str {
    outbox_runtime::store::truncate_chars(s, max)
}
