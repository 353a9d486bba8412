//! PostgreSQL: claims with one `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)`.

use sqlx::{Connection as _, PgConnection, Postgres};

use super::{Backend, private};

impl private::Sealed for Postgres {}

impl Backend for Postgres {
    const QUERIES: &'static str = include_str!("queries/postgres.sql");
    const NUMBERED: bool = true;

    common_methods!();

    returning_methods!();

    async fn begin_write(
        conn: &mut PgConnection,
    ) -> Result<sqlx::Transaction<'_, Postgres>, sqlx::Error> {
        conn.begin().await
    }

    async fn begin_pool_write(
        pool: &sqlx::Pool<Postgres>,
    ) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
        pool.begin().await
    }

    fn spawn_listener(
        pool: &sqlx::Pool<Postgres>,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let pool = pool.clone();
        Some(tokio::spawn(async move {
            loop {
                match listen(&pool, &wake).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox LISTEN failed; retrying in 1 s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        }))
    }
}

/// Wakes relays on every commit that inserted outbox rows (the insert runs `pg_notify`, which
/// PostgreSQL delivers at commit).
async fn listen(
    pool: &sqlx::Pool<Postgres>,
    wake: &tokio::sync::Notify,
) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen("outbox").await?;
    loop {
        listener.recv().await?;
        wake.notify_waiters();
    }
}
