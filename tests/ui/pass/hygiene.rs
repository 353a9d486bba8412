// The generated code must not pick up user items that shadow the prelude or the crate name.
#![allow(dead_code, non_camel_case_types)]

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

struct Result;
struct Ok;
struct Err;
struct Option;
struct Some;
struct None;
struct String;
struct Vec;
struct Box;
struct Send;
struct Sync;
struct Future;
mod outbox_runtime {}
mod core {}
mod std {}

#[derive(Serialize, Deserialize, JsonSchema, ::outbox_runtime::OutboxEvent)]
#[outbox(event_type = "hygiene.checked", version = 1, service = "hygiene", key = id, aggregate = group())]
pub struct Checked {
    #[outbox(validate(non_empty, length(max = 8), regex = "[a-z]+"))]
    pub id: ::std::string::String,
    #[outbox(validate(range(min = 1)))]
    pub n: u32,
}

impl Checked {
    fn group(&self) -> ::std::string::String {
        ::std::format!("g-{}", self.n)
    }
}

#[derive(::outbox_runtime::OutboxService)]
#[outbox(service = "hygiene")]
pub enum HygieneEvents {
    Checked(Checked),
}

struct H;
impl<C: ?Sized + ::core::marker::Send> HygieneEventsHandler<C> for H {
    async fn checked(&self, _: &mut C, _: Checked) -> ::core::result::Result<(), ::outbox_runtime::HandlerError> {
        ::core::result::Result::Ok(())
    }
}

fn main() {
    use ::outbox_runtime::{OutboxEvent, OutboxService, Validate};
    let e = Checked { id: "abc".into(), n: 0 };
    ::std::assert_eq!(e.message_key().as_deref(), ::core::option::Option::Some("abc"));
    ::std::assert_eq!(e.aggregate_id().as_deref(), ::core::option::Option::Some("g-0"));
    ::std::assert!(e.validate().is_err());
    ::std::assert!(<HygieneEvents as OutboxService>::decode("hygiene.checked", 1, br#"{"id":"ab","n":2}"#).is_ok());
    fn needs_dispatch<S: ::outbox_runtime::Dispatch<H, ()>>() {}
    needs_dispatch::<HygieneEvents>();
}
