//! What the three backends share: binding [`Arg`]s and decoding rows. The code is the same text
//! for each database but not the same types, so it is stamped out by macros. A build with no
//! database feature (`kafka` alone, for a relay or consumer generic over a backend of the
//! user's) stamps out none of them.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(unused_macros)
)]

/// Binds every argument to a `sqlx::query`.
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut q = $query;
        for arg in $args {
            q = match arg {
                $crate::store::Arg::I64(v) => q.bind(v),
                $crate::store::Arg::Str(v) => q.bind(v),
                $crate::store::Arg::OptStr(v) => q.bind(v),
                $crate::store::Arg::OptI64(v) => q.bind(v),
            };
        }
        q
    }};
}

/// Decodes an [`OutboxRow`](crate::store::OutboxRow) selected with `{columns}`.
macro_rules! decode_row {
    ($row:expr) => {{
        use sqlx::Row as _;
        let r = $row;
        let status: String = r.try_get(10)?;
        $crate::store::OutboxRow {
            id: r.try_get(0)?,
            event_id: r.try_get(1)?,
            event_type: r.try_get(2)?,
            event_version: r.try_get(3)?,
            service: r.try_get(4)?,
            topic: r.try_get(5)?,
            message_key: r.try_get(6)?,
            aggregate_id: r.try_get(7)?,
            payload: r.try_get(8)?,
            headers: r.try_get(9)?,
            status: $crate::store::Status::parse(&status).ok_or_else(|| {
                sqlx::Error::Decode(format!("unknown outbox status `{status}`").into())
            })?,
            attempts: r.try_get(11)?,
            max_attempts: r.try_get(12)?,
            next_attempt_at: r.try_get(13)?,
            lease_owner: r.try_get(14)?,
            lease_until: r.try_get(15)?,
            last_error: r.try_get(16)?,
            dead_reason: r.try_get(17)?,
            published_at: r.try_get(18)?,
            consumed_at: r.try_get(19)?,
            created_at: r.try_get(20)?,
            updated_at: r.try_get(21)?,
        }
    }};
}

/// The [`Backend`](crate::store::Backend) methods whose text is the same on every database.
macro_rules! common_methods {
    () => {
        async fn execute(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<u64, sqlx::Error> {
            let done = bind_all!(sqlx::query(sql), args).execute(conn).await?;
            Ok(done.rows_affected())
        }

        async fn execute_text(
            conn: &mut Self::Connection,
            sql: &'static str,
        ) -> Result<(), sqlx::Error> {
            sqlx::Executor::execute(conn, sql).await?;
            Ok(())
        }

        async fn fetch_rows(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<$crate::store::OutboxRow>, sqlx::Error> {
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(decode_row!(row));
            }
            Ok(out)
        }

        async fn fetch_pairs(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<(String, i64)>, sqlx::Error> {
            use sqlx::Row as _;
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        }

        async fn fetch_bytes(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<(String, Vec<u8>)>, sqlx::Error> {
            use sqlx::Row as _;
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        }

        async fn fetch_go_due(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<$crate::store::GoDue>, sqlx::Error> {
            use sqlx::Row as _;
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            rows.iter()
                .map(|r| {
                    Ok($crate::store::GoDue {
                        id: r.try_get(0)?,
                        service_name: r.try_get(1)?,
                        message_key: r.try_get(2)?,
                        payload: r.try_get(3)?,
                    })
                })
                .collect()
        }

        async fn fetch_ints(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<Option<i64>>, sqlx::Error> {
            use sqlx::Row as _;
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            rows.iter().map(|r| r.try_get(0)).collect()
        }

        async fn fetch_inbox_dead(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<$crate::store::InboxDead>, sqlx::Error> {
            use sqlx::Row as _;
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            rows.iter()
                .map(|r| {
                    Ok($crate::store::InboxDead {
                        group: r.try_get(0)?,
                        event_id: r.try_get(1)?,
                        event_type: r.try_get(2)?,
                        event_version: r.try_get(3)?,
                        topic: r.try_get(4)?,
                        reason: r.try_get(5)?,
                        last_error: r.try_get(6)?,
                        attempts: r.try_get(7)?,
                        envelope: r.try_get(8)?,
                        dead_at: r.try_get(9)?,
                        message_key: r.try_get(10)?,
                    })
                })
                .collect()
        }

        async fn fetch_inbox_retries(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<$crate::store::InboxRetry>, sqlx::Error> {
            use sqlx::Row as _;
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            rows.iter()
                .map(|r| {
                    Ok($crate::store::InboxRetry {
                        group: r.try_get(0)?,
                        event_id: r.try_get(1)?,
                        topic: r.try_get(2)?,
                        message_key: r.try_get(3)?,
                        envelope: r.try_get(4)?,
                        traceparent: r.try_get(5)?,
                        attempts: r.try_get(6)?,
                        next_attempt_at: r.try_get(7)?,
                        last_error: r.try_get(8)?,
                    })
                })
                .collect()
        }

        async fn fetch_window(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<Vec<$crate::store::WindowRow>, sqlx::Error> {
            use sqlx::Row as _;
            let rows = bind_all!(sqlx::query(sql), args).fetch_all(conn).await?;
            rows.iter()
                .map(|r| {
                    Ok($crate::store::WindowRow {
                        id: r.try_get(0)?,
                        key: r.try_get(1)?,
                        claimable: r.try_get::<i64, _>(2)? == 1,
                    })
                })
                .collect()
        }
    };
}

/// `insert` and `claim_update` of the dialects with `RETURNING` (PostgreSQL, SQLite): one
/// statement each.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
macro_rules! returning_methods {
    () => {
        async fn insert(
            conn: &mut Self::Connection,
            sql: &str,
            args: Vec<$crate::store::Arg>,
        ) -> Result<i64, sqlx::Error> {
            use sqlx::Row as _;
            bind_all!(sqlx::query(sql), args)
                .fetch_one(conn)
                .await?
                .try_get(0)
        }

        async fn claim_update(
            sql: &$crate::store::TableSql,
            conn: &mut Self::Connection,
            mut args: Vec<$crate::store::Arg>,
            ids: &[i64],
            how: $crate::store::RowIds,
        ) -> Result<Vec<$crate::store::OutboxRow>, sqlx::Error> {
            let update = sql.with_row_ids("claim_update", &mut args, ids, how);
            Self::fetch_rows(conn, &update, args).await
        }
    };
}
