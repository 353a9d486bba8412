//! SQLite: one writer at a time, so a single `UPDATE ... RETURNING` claims atomically, and
//! write transactions begin `IMMEDIATE` so that a read followed by a write cannot fail to
//! upgrade its lock.

use sqlx::{Connection as _, Sqlite, SqliteConnection};

use super::{Backend, private};

impl private::Sealed for Sqlite {}

impl Backend for Sqlite {
    const QUERIES: &'static str = include_str!("queries/sqlite.sql");
    const NUMBERED: bool = false;
    const ONE_WRITER: bool = true;

    common_methods!();

    returning_methods!();

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
}
