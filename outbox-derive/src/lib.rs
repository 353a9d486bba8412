//! Derive macros for [`outbox-runtime`](https://docs.rs/outbox-runtime) and
//! [`outbox-contract`](https://docs.rs/outbox-contract). Use them through either crate, which
//! re-exports them next to the traits they implement; the code they generate names the crate
//! they came through (or the path given with `#[outbox(crate = "...")]`).

mod ast;
mod attr;
mod check;
mod ctxt;
mod expand;
mod symbol;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

use crate::ast::Root;

/// Implements `outbox_runtime::OutboxEvent` and `outbox_runtime::Validate`.
///
/// ```text
/// #[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
/// #[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification",
///          key = user_id)]
/// pub struct FeishuRequested { pub user_id: u64, pub text: String }
/// ```
#[proc_macro_derive(OutboxEvent, attributes(outbox))]
pub fn derive_outbox_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::event::derive(&input, Root::Runtime).into()
}

/// Implements `outbox_runtime::OutboxService` on an enum of one service's events, and generates
/// the service's handler trait.
#[proc_macro_derive(OutboxService, attributes(outbox))]
pub fn derive_outbox_service(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::service::derive(&input, Root::Runtime).into()
}

/// Implements `outbox_runtime::Validate` for a struct nested inside an event payload.
#[proc_macro_derive(Validate, attributes(outbox))]
pub fn derive_validate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::validate::derive(&input, Root::Runtime).into()
}

/// `OutboxEvent` as `outbox_contract` re-exports it: the same derive, naming `::outbox_contract`.
#[doc(hidden)]
#[proc_macro_derive(ContractOutboxEvent, attributes(outbox))]
pub fn derive_contract_outbox_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::event::derive(&input, Root::Contract).into()
}

/// `OutboxService` as `outbox_contract` re-exports it.
#[doc(hidden)]
#[proc_macro_derive(ContractOutboxService, attributes(outbox))]
pub fn derive_contract_outbox_service(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::service::derive(&input, Root::Contract).into()
}

/// `Validate` as `outbox_contract` re-exports it.
#[doc(hidden)]
#[proc_macro_derive(ContractValidate, attributes(outbox))]
pub fn derive_contract_validate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::validate::derive(&input, Root::Contract).into()
}
