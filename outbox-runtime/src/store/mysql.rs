//! MySQL 8 and MariaDB 10.6+: no `UPDATE ... RETURNING`, so a claim updates the rows it
//! locked and reads them back; a claim InnoDB picked as a deadlock victim runs again. The
//! relay's transactions read the rows they chose by ranges of ids, at `READ COMMITTED`
//! ([`begin_relay`]).
//!
//! The claim's plan is a plain (non-locking) read, on purpose: InnoDB's locking reads skip
//! another claimer's locked rows, and the plan must see every open row of a key to know where
//! the key's run of claimable rows ends.

use sqlx::{Connection as _, MySql, MySqlConnection};

use super::{Arg, Backend, ClaimArgs, OutboxRow, RowIds, TableSql, private};

/// Awaits `$run` (a whole transaction on the table of `$sql`) again when InnoDB picked it as a
/// deadlock victim, up to `DEADLOCK_RETRIES` times, and once more with lists of ids when the
/// server refused its writes at `READ COMMITTED` (see [`begin_relay`]). A macro rather than a
/// function: each try borrows the connection anew.
macro_rules! retrying {
    ($sql:expr, $run:expr) => {{
        let mut tries = 0;
        loop {
            match $run.await {
                Err(e) if is_deadlock(&e) && tries < DEADLOCK_RETRIES => tries += 1,
                Err(e) if refuses_read_committed(&e) && $sql.ranges() => {
                    tracing::warn!(
                        error = %e,
                        "the server refuses writes at READ COMMITTED (its binary log is in \
                         statement format): the relay reads rows by lists of ids from now on"
                    );
                    $sql.refuse_ranges();
                }
                other => break other,
            }
        }
    }};
}

impl private::Sealed for MySql {}

impl Backend for MySql {
    const QUERIES: &'static str = include_str!("queries/mysql.sql");
    const NUMBERED: bool = false;
    const ADDED_COLUMNS: &'static [&'static str] = &["room"];

    common_methods!();

    async fn insert(
        conn: &mut MySqlConnection,
        sql: &str,
        args: Vec<Arg>,
    ) -> Result<i64, sqlx::Error> {
        let done = bind_all!(sqlx::query(sql), args).execute(conn).await?;
        i64::try_from(done.last_insert_id())
            .map_err(|e| sqlx::Error::Decode(format!("insert id out of range: {e}").into()))
    }

    async fn begin_write(
        conn: &mut MySqlConnection,
    ) -> Result<sqlx::Transaction<'_, MySql>, sqlx::Error> {
        conn.begin().await
    }

    async fn expire_leases(
        sql: &TableSql,
        conn: &mut MySqlConnection,
        now: i64,
    ) -> Result<u64, sqlx::Error> {
        let ids: Vec<i64> =
            Self::fetch_ints(conn, sql.get("expire_candidates"), vec![Arg::I64(now)])
                .await?
                .into_iter()
                .flatten()
                .collect();
        let mut changed = 0;
        for chunk in ids.chunks(1024) {
            changed += retrying!(sql, expire_chunk(sql, conn, now, chunk))?;
        }
        Ok(changed)
    }

    fn begin_relay<'c>(
        sql: &TableSql,
        conn: &'c mut MySqlConnection,
    ) -> impl Future<Output = Result<(sqlx::Transaction<'c, MySql>, RowIds), sqlx::Error>> + Send
    {
        begin_relay(sql, conn)
    }

    async fn begin_pool_write(
        pool: &sqlx::Pool<MySql>,
    ) -> Result<sqlx::Transaction<'static, MySql>, sqlx::Error> {
        pool.begin().await
    }

    async fn mark_published(
        sql: &TableSql,
        conn: &mut MySqlConnection,
        now: i64,
        owner: &str,
        ids: &[i64],
    ) -> Result<u64, sqlx::Error> {
        retrying!(sql, mark_published_once(sql, conn, now, owner, ids))
    }

    async fn claim_update(
        sql: &TableSql,
        conn: &mut MySqlConnection,
        mut args: Vec<Arg>,
        ids: &[i64],
        how: RowIds,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let update = sql.with_row_ids("claim_update", &mut args, ids, how);
        Self::execute(conn, &update, args).await?;
        let mut args = Vec::new();
        let select = sql.with_row_ids("select_ids", &mut args, ids, how);
        Self::fetch_rows(conn, &select, args).await
    }

    async fn claim(
        sql: &TableSql,
        conn: &mut MySqlConnection,
        c: ClaimArgs,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        retrying!(sql, super::claim_rows::<MySql>(sql, conn, c.clone()))
    }
}

/// Begins a relay's transaction, and says how its statements name the rows they chose: by
/// ranges of ids at `READ COMMITTED`; by lists at the server's default level once the server
/// refused `READ COMMITTED` on this table; by lists inside a transaction the caller holds (a
/// savepoint, at the caller's level, whose locks last as long as the caller's transaction).
///
/// A locking read or an update that scans a range locks, at `REPEATABLE READ` (InnoDB's
/// default), the record after the range's end too, and at the end of the table the gap every
/// insert goes into: a claim of a backlog's last rows would hold every writer's insert until it
/// committed, and a claim of rows 2–3 another relay's row 4. At `READ COMMITTED` it locks the
/// rows it keeps and nothing else. The level is set for this transaction alone, in the
/// statement that begins it, so it never outlives it on a pooled connection.
///
/// A server that writes its binary log as statements (`binlog_format = STATEMENT`) refuses
/// InnoDB writes at `READ COMMITTED`; [`retrying!`] then turns the table to lists of ids, whose
/// point lookups lock no gap at any level.
async fn begin_relay<'c>(
    sql: &TableSql,
    conn: &'c mut MySqlConnection,
) -> Result<(sqlx::Transaction<'c, MySql>, RowIds), sqlx::Error> {
    if sql.ranges() && !conn.is_in_transaction() {
        let tx = conn
            .begin_with("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION")
            .await?;
        Ok((tx, RowIds::Ranges))
    } else {
        Ok((conn.begin().await?, RowIds::Lists))
    }
}

/// Error 1665: the server logs statements, and InnoDB logs only rows at `READ COMMITTED`.
fn refuses_read_committed(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|d| d.number() == 1665)
}

/// InnoDB may still pick a claim as a deadlock victim (at `REPEATABLE READ`, after the server
/// refused `READ COMMITTED`, its gap locks are not ours to choose); the claim rolled back
/// whole, so it is safe to run again.
const DEADLOCK_RETRIES: u32 = 3;

fn is_deadlock(e: &sqlx::Error) -> bool {
    // 1213: deadlock, 1205: lock wait timeout.
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|d| matches!(d.number(), 1213 | 1205))
}

/// Locks the rows still leased to `owner` that no one else holds, and marks those published.
async fn mark_published_once(
    sql: &TableSql,
    conn: &mut MySqlConnection,
    now: i64,
    owner: &str,
    ids: &[i64],
) -> Result<u64, sqlx::Error> {
    let owner = Arg::Str(owner.to_owned());
    let update = [Arg::I64(now), Arg::I64(now)];
    lock_then_update(
        sql,
        conn,
        ("mark_published_lock", &[owner]),
        ("mark_published", &update),
        ids,
    )
    .await
}

/// Expires the leases of `ids` that no one holds locked.
async fn expire_chunk(
    sql: &TableSql,
    conn: &mut MySqlConnection,
    now: i64,
    ids: &[i64],
) -> Result<u64, sqlx::Error> {
    let update = [Arg::I64(now)];
    lock_then_update(
        sql,
        conn,
        ("expire_lock", &[Arg::I64(now)]),
        ("expire_leases", &update),
        ids,
    )
    .await
}

/// In one transaction: `lock` (a `SELECT id ... FOR UPDATE SKIP LOCKED` over `ids`, after its
/// own arguments), then `update` of the ids it locked. Each query's `{ids}` list comes after its
/// arguments.
async fn lock_then_update(
    sql: &TableSql,
    conn: &mut MySqlConnection,
    (lock, lock_args): (&str, &[Arg]),
    (update, update_args): (&str, &[Arg]),
    ids: &[i64],
) -> Result<u64, sqlx::Error> {
    let (mut tx, how) = begin_relay(sql, conn).await?;
    let mut args = lock_args.to_vec();
    let query = sql.with_row_ids(lock, &mut args, ids, how);
    let locked: Vec<i64> = MySql::fetch_ints(&mut tx, &query, args)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let mut changed = 0;
    if !locked.is_empty() {
        let mut args = update_args.to_vec();
        let query = sql.with_row_ids(update, &mut args, &locked, how);
        changed = MySql::execute(&mut tx, &query, args).await?;
    }
    tx.commit().await?;
    Ok(changed)
}
