// A contracts crate that depends on `outbox-contract` alone (no database, broker or async
// runtime): the derives name `::outbox_contract`, and the contract works in full.
use outbox_contract::{OutboxEvent, OutboxService, Validate};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, JsonSchema, Validate)]
pub struct Line {
    #[outbox(validate(non_empty))]
    pub sku: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "ledger.entry.posted", version = 1, service = "ledger", key = account)]
pub struct EntryPosted {
    #[outbox(validate(non_empty))]
    pub account: String,
    #[outbox(validate(nested))]
    pub lines: Vec<Line>,
}

#[derive(Debug, OutboxService)]
#[outbox(service = "ledger")]
pub enum LedgerEvents {
    EntryPosted(EntryPosted),
}

// The same derives through a path of the user's choosing, as `#[serde(crate = "...")]`.
mod facade {
    pub use outbox_contract as outbox;
}

#[derive(Serialize, Deserialize, JsonSchema, outbox_contract::OutboxEvent)]
#[outbox(crate = "facade::outbox", event_type = "ledger.entry.voided", version = 1, service = "voids")]
pub struct EntryVoided {
    pub account: String,
}

#[derive(outbox_contract::OutboxService)]
#[outbox(crate = "facade::outbox", service = "voids")]
pub enum VoidEvents {
    EntryVoided(EntryVoided),
}

fn listed<E: outbox_contract::OutboxEvent + outbox_contract::Listed>() -> &'static str {
    <E::Service as outbox_contract::OutboxService>::SERVICE
}

fn main() {
    let ok = LedgerEvents::decode(
        "ledger.entry.posted",
        1,
        br#"{"account":"a-1","lines":[{"sku":"x"}]}"#,
    );
    assert!(matches!(ok, Ok(LedgerEvents::EntryPosted(_))));
    let bad = LedgerEvents::decode(
        "ledger.entry.posted",
        1,
        br#"{"account":"a-1","lines":[{"sku":" "}]}"#,
    );
    assert_eq!(bad.unwrap_err().reason(), "invalid_payload");
    assert_eq!(listed::<EntryPosted>(), "ledger");
    assert_eq!(listed::<EntryVoided>(), "voids");
    let catalog = outbox_contract::Catalog::builder(outbox_contract::RouteConfig::new())
        .service::<LedgerEvents>()
        .unwrap()
        .service::<VoidEvents>()
        .unwrap()
        .build();
    assert_eq!(catalog.enum_of("ledger"), Some(std::any::type_name::<LedgerEvents>()));
}
