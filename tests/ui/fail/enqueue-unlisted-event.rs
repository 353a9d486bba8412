// An event that no `#[derive(OutboxService)]` enum lists has no route and no handler: storing
// it would only dead-letter it later, so `enqueue` does not compile.
use outbox_runtime::sqlx::{Sqlite, SqliteConnection};
use outbox_runtime::{Outbox, OutboxEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "ledger.entry.posted", version = 1, service = "ledger", key = account)]
pub struct EntryPosted {
    pub account: String,
    pub cents: i64,
}

async fn post(outbox: &Outbox<Sqlite>, conn: &mut SqliteConnection) {
    let event = EntryPosted { account: "a-1".into(), cents: 5 };
    let _ = outbox.enqueue(conn, &event).await;
}

fn main() {
    let _ = post;
}
