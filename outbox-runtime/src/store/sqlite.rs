//! SQLite: one writer at a time, so a single `UPDATE ... RETURNING` claims atomically, and
//! write transactions begin `IMMEDIATE` so that a read followed by a write cannot fail to
//! upgrade its lock.

use sqlx::{Connection as _, Sqlite, SqliteConnection};

use super::{Arg, Backend, ClaimArgs, OutboxRow, TableSql, private};

impl private::Sealed for Sqlite {}

impl Backend for Sqlite {
    const QUERIES: &'static str = include_str!("queries/sqlite.sql");
    const NUMBERED: bool = false;

    common_methods!();

    async fn insert(
        conn: &mut SqliteConnection,
        sql: &str,
        args: Vec<Arg>,
    ) -> Result<i64, sqlx::Error> {
        use sqlx::Row as _;
        bind_all!(sqlx::query(sql), args)
            .fetch_one(conn)
            .await?
            .try_get(0)
    }

    async fn begin_write(
        conn: &mut SqliteConnection,
    ) -> Result<sqlx::Transaction<'_, Sqlite>, sqlx::Error> {
        // Inside the caller's transaction: a savepoint (the caller chose how it began).
        if conn.is_in_transaction() {
            conn.begin().await
        } else {
            conn.begin_with("BEGIN IMMEDIATE").await
        }
    }

    async fn begin_pool_write(
        pool: &sqlx::Pool<Sqlite>,
    ) -> Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn claim(
        sql: &TableSql,
        conn: &mut SqliteConnection,
        c: ClaimArgs,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let args = vec![
            Arg::Str(c.owner),
            Arg::I64(c.lease_until),
            Arg::I64(c.now),
            Arg::I64(c.now),
            Arg::I64(c.now),
            Arg::I64(c.limit),
        ];
        let mut rows = Self::fetch_rows(conn, sql.get("claim"), args).await?;
        rows.sort_unstable_by_key(|r| r.id);
        Ok(rows)
    }
}
