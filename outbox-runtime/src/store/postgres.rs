//! PostgreSQL: claims with one `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)`.

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{Connection as _, PgConnection, Postgres};

use super::{Backend, Error, ReplicationTarget, private};

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

    fn replication_target(
        pool: &sqlx::Pool<Postgres>,
        url: Option<&str>,
    ) -> Result<Option<ReplicationTarget>, Error> {
        let (options, password) = match url {
            Some(url) => url_options(url)?,
            None => ((*pool.connect_options()).clone(), None),
        };
        let password = libpq_password(&options, password);
        Ok(Some(target_of(&options, password)))
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

/// The connect options of a `postgres://` URL, with the password libpq would send where the URL
/// has none and `PGPASSWORD` is unset: the password file's (`PGPASSFILE`, else `~/.pgpass`),
/// its `\:` and `\\` read as `:` and `\`. sqlx 0.8 reads the file too but keeps a password's
/// escapes as written, so that a password with `:` or `\` in it is refused; a pool made with
/// these options is not (and neither is the relay's replication stream, which reads the file
/// the same way).
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let options = outbox_runtime::store::connect_options("postgres://relay@db.internal/app")?;
/// let pool = outbox_runtime::sqlx::postgres::PgPoolOptions::new()
///     .connect_with(options)
///     .await?;
/// # Ok(()) }
/// ```
pub fn connect_options(url: &str) -> Result<PgConnectOptions, Error> {
    let (options, password) = url_options(url)?;
    Ok(match libpq_password(&options, password) {
        Some(password) => options.password(&password),
        None => options,
    })
}

/// The password libpq sends for `options`, in its order: the URL's (`from_url`), else a
/// non-empty `PGPASSWORD`, else the password file's line for their server, database and user.
fn libpq_password(options: &PgConnectOptions, from_url: Option<String>) -> Option<String> {
    from_url
        .or_else(|| std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()))
        .or_else(|| super::pgpass::password(&target_of(options, None)))
}

/// A `postgres://` URL's options, and its password (which the options do not tell).
fn url_options(url: &str) -> Result<(PgConnectOptions, Option<String>), Error> {
    let options: PgConnectOptions = url.parse()?;
    let parsed =
        url::Url::parse(url).map_err(|e| Error::Database(sqlx::Error::Configuration(e.into())))?;
    let password = parsed.password().map(|p| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    });
    Ok((options, password))
}

/// Where a replication connection made with `options` goes.
fn target_of(options: &PgConnectOptions, password: Option<String>) -> ReplicationTarget {
    let host = match options.get_socket() {
        Some(dir) => dir.to_string_lossy().into_owned(),
        None => options.get_host().to_owned(),
    };
    ReplicationTarget {
        host,
        port: options.get_port(),
        user: options.get_username().to_owned(),
        password,
        database: options
            .get_database()
            .unwrap_or(options.get_username())
            .to_owned(),
        tls: matches!(
            options.get_ssl_mode(),
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replication_url_gives_its_server_user_database_and_decoded_password() {
        let (options, password) =
            url_options("postgres://relay:p%40ss+w%2Fd@db.example:6543/app?sslmode=require")
                .unwrap();
        let target = target_of(&options, password);
        assert_eq!(target.host, "db.example");
        assert_eq!(target.port, 6543);
        assert_eq!(target.user, "relay");
        assert_eq!(target.password.as_deref(), Some("p@ss+w/d"));
        assert_eq!(target.database, "app");
        assert!(target.tls);
        assert!(!format!("{target:?}").contains("p@ss"), "{target:?}");
        let (options, password) = url_options("postgres://u@127.0.0.1/test").unwrap();
        let target = target_of(&options, password);
        assert_eq!(
            (target.port, target.password, target.tls),
            (5432, None, false)
        );
    }
}
