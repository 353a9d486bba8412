//! A service's slot read over PostgreSQL's streaming replication protocol
//! (`START_REPLICATION ... LOGICAL`, through `pgwire-replication`).
//!
//! The SQL interface (`pg_logical_slot_peek_binary_changes`) decodes the log from the slot's
//! restart point on every read, and PostgreSQL moves that point only when it logs a snapshot of
//! the running transactions (every 15 s): a busy relay decodes the same WAL again and again.
//! A stream is decoded once, by the server's WAL sender, as it is written; the relay
//! acknowledges what the broker took with standby status updates, which is what advances the
//! slot (no `pg_replication_slot_advance`, which decodes again too).
//!
//! The stream holds the slot for as long as it is open: another reader (a second relay, or
//! `outbox status` peeking) is refused by the server until it closes.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

use super::wal::Assembly;
use super::{Error, Lsn, ReplicationTarget, WalBatch, WalItem};

/// The publication the relay's slots are read through (it has no table: only messages pass).
const PUBLICATION: &str = "outbox_wal";

/// An open replication stream of one service's slot.
#[doc(hidden)]
pub struct WalStream {
    client: ReplicationClient,
    service: String,
    slot: String,
    /// What was received; its `ready` events are those not yet handed out (or handed back by
    /// [`WalStream::put_back`]), each with its commit position (the end of its commit record).
    got: Assembly,
}

impl std::fmt::Debug for WalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStream")
            .field("service", &self.service)
            .field("ready", &self.got.ready.len())
            .field("end", &self.got.end)
            .finish_non_exhaustive()
    }
}

impl WalStream {
    /// Starts streaming `slot` from `from` (its confirmed position) for the messages of
    /// `prefix` ([`Outbox::wal_prefix`](super::Outbox::wal_prefix)), acknowledging at most
    /// `from` until told more; status updates go out every `status_every`, and about `batch`
    /// events are received ahead of the relay. Returns once the server accepted the start:
    /// from then on the stream holds the slot.
    pub async fn open(
        target: &ReplicationTarget,
        service: &str,
        slot: &str,
        prefix: String,
        from: Lsn,
        status_every: Duration,
        batch: usize,
    ) -> Result<WalStream, Error> {
        let failed = |reason: String| Error::WalStream {
            service: service.to_owned(),
            slot: slot.to_owned(),
            reason,
        };
        if target.tls {
            return Err(failed(
                "the database asks for TLS (sslmode require or stricter), and the relay's \
                 stream has no TLS: read the slot through the SQL interface \
                 (`RelayConfig::wal_read(WalRead::Sql)`; for `outbox relay`, `\"wal_read\": \"sql\"` \
                 in the config file's `relay`)"
                    .into(),
            ));
        }
        let position = pgwire_replication::Lsn::from(from.0);
        let config = ReplicationConfig::new(
            target.host.clone(),
            target.user.clone(),
            target.password.clone().unwrap_or_default(),
            target.database.clone(),
            slot,
            PUBLICATION,
        )
        .with_port(target.port)
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(position)
        .with_ack_lsn(position)
        .with_status_interval(status_every)
        // Three changes per event: its transaction's begin, the message, the commit.
        .with_buffer_size(batch.saturating_mul(3).clamp(1024, 1 << 20))
        .with_application_name("outbox-relay");
        let explain = |e: pgwire_replication::PgWireError| {
            let text = e.to_string();
            let hint = hint(&text);
            failed(format!("{text}{hint}"))
        };
        let mut client = ReplicationClient::connect(config).await.map_err(explain)?;
        client.wait_started().await.map_err(explain)?;
        let mut got = Assembly::new(service, prefix);
        got.reached(from);
        Ok(WalStream {
            client,
            service: service.to_owned(),
            slot: slot.to_owned(),
            got,
        })
    }

    /// Hands out whole transactions received so far, in commit order: at least `max` events
    /// when as many are there (a transaction is never cut). Waits for nothing.
    pub async fn read(&mut self, max: usize) -> Result<WalBatch, Error> {
        // Outside tokio's cooperative budget, which would end the drain after 128 changes (43
        // events) whatever is waiting.
        tokio::task::unconstrained(std::future::poll_fn(|_| Poll::Ready(self.drain(max)))).await?;
        let ready = &mut self.got.ready;
        let mut items = Vec::with_capacity(ready.len().min(max));
        while let Some((_, commit)) = ready.front() {
            if items.len() >= max && items.last().is_none_or(|(_, c)| c != commit) {
                break;
            }
            items.extend(ready.pop_front());
        }
        let end = if ready.is_empty() {
            self.got.end
        } else {
            items.last().map(|(_, c)| *c)
        };
        Ok(WalBatch {
            changes: items.len(),
            items,
            end,
        })
    }

    /// Whether events are waiting to be handed out.
    pub fn has_more(&self) -> bool {
        !self.got.ready.is_empty()
    }

    /// Waits until the stream delivers something (returns at once when events are waiting).
    /// Cancel-safe: what arrives is kept for the next [`WalStream::read`].
    pub async fn wait(&mut self) -> Result<(), Error> {
        if self.has_more() {
            return Ok(());
        }
        let got = self.client.recv().await;
        self.take(got)
    }

    /// Gives back events handed out and not published, to be handed out first again.
    pub fn put_back(&mut self, items: Vec<(WalItem, Lsn)>) {
        for item in items.into_iter().rev() {
            self.got.ready.push_front(item);
        }
    }

    /// Acknowledges everything up to `lsn` (a commit position or an `end` this stream handed
    /// out): the next status update tells the server, which then advances the slot.
    pub fn confirm(&self, lsn: Lsn) {
        self.client
            .update_applied_lsn(pgwire_replication::Lsn::from(lsn.0));
    }

    /// Ends the stream and gives the slot up.
    pub async fn close(mut self) {
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!(service = %self.service, error = %e, "replication stream closed with an error");
        }
    }

    /// Takes what the stream has delivered until `max` events are ready.
    fn drain(&mut self, max: usize) -> Result<(), Error> {
        while self.got.ready.len() < max {
            match self.poll_now() {
                Poll::Ready(got) => self.take(got)?,
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    fn poll_now(
        &mut self,
    ) -> Poll<Result<Option<ReplicationEvent>, pgwire_replication::PgWireError>> {
        let mut cx = Context::from_waker(Waker::noop());
        pin!(self.client.recv()).as_mut().poll(&mut cx)
    }

    fn take(
        &mut self,
        got: Result<Option<ReplicationEvent>, pgwire_replication::PgWireError>,
    ) -> Result<(), Error> {
        let failed = |reason: String| Error::WalStream {
            service: self.service.clone(),
            slot: self.slot.clone(),
            reason,
        };
        let event = match got {
            Ok(Some(event)) => event,
            Ok(None) => return Err(failed("the server ended the stream".into())),
            Err(e) => return Err(failed(e.to_string())),
        };
        match event {
            ReplicationEvent::Begin { .. } => self.got.begin(),
            ReplicationEvent::Message {
                lsn,
                prefix,
                content,
                ..
            } => {
                let at = Lsn(u64::from(lsn));
                self.got.message(at, at, prefix.as_bytes(), &content);
            }
            ReplicationEvent::Commit { end_lsn, .. } => self.got.commit(Lsn(u64::from(end_lsn))),
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.got.sender_at(Lsn(u64::from(wal_end)));
            }
            // Other `pgoutput` changes (relations, types) cannot carry an event: the
            // publication has no table.
            ReplicationEvent::XLogData { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }
}

/// What to do about a refused stream, after the server's own words.
fn hint(error: &str) -> &'static str {
    if error.contains("password") || error.contains("authentication") {
        "; give the relay the replication connection's URL with its password \
         (`RelayConfig::replication_url`, `outbox relay --database-url`), set PGPASSWORD or put \
         it in the password file (~/.pgpass), or read through the SQL interface (`WalRead::Sql`)"
    } else if error.contains("replication role") || error.contains("permission denied") {
        "; the user needs the REPLICATION attribute (`ALTER ROLE ... REPLICATION`)"
    } else if error.contains("invalidated") || error.contains("can no longer get changes") {
        "; PostgreSQL dropped the WAL this slot still needed (`max_slot_wal_keep_size`): the \
         events it held and the relay had not published are gone from it; drop the slot \
         (`SELECT pg_drop_replication_slot('<slot>')`) and run `outbox migrate`, which makes it \
         again from now on"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_needs_tls_is_refused_with_the_fix() {
        let target = ReplicationTarget {
            host: "db.example".into(),
            port: 5432,
            user: "relay".into(),
            password: None,
            database: "app".into(),
            tls: true,
        };
        let refused = WalStream::open(
            &target,
            "task",
            "outbox_task",
            "outbox:task".into(),
            Lsn(0),
            Duration::from_millis(100),
            100,
        )
        .await
        .unwrap_err();
        let text = refused.to_string();
        assert!(matches!(refused, Error::WalStream { .. }), "{text}");
        assert!(
            text.contains("outbox_task") && text.contains("WalRead::Sql"),
            "{text}"
        );
    }

    #[test]
    fn a_refused_stream_names_the_fix() {
        // The server's words, as PostgreSQL 15 writes them.
        let auth = hint("password authentication failed for user \"relay\"");
        assert!(
            auth.contains("replication_url") && auth.contains("PGPASSWORD"),
            "{auth}"
        );
        let role = hint("must be superuser or replication role to start walsender");
        assert!(role.contains("ALTER ROLE"), "{role}");
        let lost = hint(
            "can no longer get changes from replication slot \"outbox_t_task\": This slot has \
             been invalidated because it exceeded the maximum reserved size.",
        );
        assert!(lost.contains("outbox migrate") && lost.contains("max_slot_wal_keep_size"));
        assert_eq!(hint("connection refused"), "");
    }
}
