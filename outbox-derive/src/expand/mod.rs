//! Code generation. Reads only the intermediate form in [`crate::ast`]; generated code uses
//! absolute paths (`::outbox_runtime::…`, `::core::…`) so user items named `Result`, `Option`
//! or `outbox_runtime` cannot capture it.

pub(crate) mod event;
pub(crate) mod service;
pub(crate) mod validate;
