//! Derive macros for [`outbox-runtime`](https://docs.rs/outbox-runtime). Use them through that
//! crate, which re-exports them next to the traits they implement.

mod ast;
mod attr;
mod check;
mod ctxt;
mod expand;
mod symbol;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

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
    expand::event::derive(&input).into()
}

/// Implements `outbox_runtime::OutboxService` on an enum of one service's events, and generates
/// the service's handler trait.
#[proc_macro_derive(OutboxService, attributes(outbox))]
pub fn derive_outbox_service(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::service::derive(&input).into()
}

/// Implements `outbox_runtime::Validate` for a struct nested inside an event payload.
#[proc_macro_derive(Validate, attributes(outbox))]
pub fn derive_validate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::validate::derive(&input).into()
}
