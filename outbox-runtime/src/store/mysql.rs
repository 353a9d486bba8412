//! MySQL 8 and MariaDB 10.6+: no `UPDATE ... RETURNING`, so a claim updates the rows it
//! locked and reads them back; a claim InnoDB picked as a deadlock victim runs again.
//!
//! The claim's plan is a plain (non-locking) read, on purpose: InnoDB's locking reads skip
//! another claimer's locked rows, and the plan must see every open row of a key to know where
//! the key's run of claimable rows ends.

use sqlx::{Connection as _, MySql, MySqlConnection};

use super::{Arg, Backend, ClaimArgs, OutboxRow, TableSql, private};

/// Awaits `$run` (a whole transaction) again when InnoDB picked it as a deadlock victim, up to
/// `DEADLOCK_RETRIES` times. A macro rather than a function: each try borrows the connection
/// anew.
macro_rules! retrying {
    ($run:expr) => {{
        let mut tries = 0;
        loop {
            match $run.await {
                Err(e) if is_deadlock(&e) && tries < DEADLOCK_RETRIES => tries += 1,
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
            changed += retrying!(expire_chunk(sql, conn, now, chunk))?;
        }
        Ok(changed)
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
        retrying!(mark_published_once(sql, conn, now, owner, ids))
    }

    async fn claim_update(
        sql: &TableSql,
        conn: &mut MySqlConnection,
        mut args: Vec<Arg>,
        ids: &[i64],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let ids = || ids.iter().map(|&id| Arg::I64(id));
        let update = sql.with_ids("claim_update", &mut args, ids());
        Self::execute(conn, &update, args).await?;
        let mut args = Vec::new();
        let select = sql.with_ids("select_ids", &mut args, ids());
        Self::fetch_rows(conn, &select, args).await
    }

    async fn claim(
        sql: &TableSql,
        conn: &mut MySqlConnection,
        c: ClaimArgs,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        retrying!(super::claim_rows::<MySql>(sql, conn, c.clone()))
    }
}

/// InnoDB may still pick a claim as a deadlock victim (its gap locks are not ours to choose);
/// the claim rolled back whole, so it is safe to run again.
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
    let mut tx = conn.begin().await?;
    let mut args = lock_args.to_vec();
    let query = sql.with_ids(lock, &mut args, ids.iter().map(|&id| Arg::I64(id)));
    let locked: Vec<i64> = MySql::fetch_ints(&mut tx, &query, args)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let mut changed = 0;
    if !locked.is_empty() {
        let mut args = update_args.to_vec();
        let query = sql.with_ids(update, &mut args, locked.iter().map(|&id| Arg::I64(id)));
        changed = MySql::execute(&mut tx, &query, args).await?;
    }
    tx.commit().await?;
    Ok(changed)
}
