//! PostgreSQL: claims with one `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)`.

use sqlx::{Connection as _, PgConnection, Postgres};

use super::{Arg, Backend, ClaimArgs, OutboxRow, TableSql, private};

impl private::Sealed for Postgres {}

impl Backend for Postgres {
    const QUERIES: &'static str = include_str!("queries/postgres.sql");
    const NUMBERED: bool = true;

    common_methods!();

    async fn insert(
        conn: &mut PgConnection,
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
        conn: &mut PgConnection,
    ) -> Result<sqlx::Transaction<'_, Postgres>, sqlx::Error> {
        conn.begin().await
    }

    async fn claim(
        sql: &TableSql,
        conn: &mut PgConnection,
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
