//! Code generation. Reads only the intermediate form in [`crate::ast`]; generated code uses
//! absolute paths (`::outbox_runtime::…`, `::core::…`) so user items named `Result`, `Option`
//! or `outbox_runtime` cannot capture it.

pub(crate) mod event;
pub(crate) mod service;
pub(crate) mod validate;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;

/// The root path (`::outbox_runtime`, ...) with every token at `span`, for `quote_spanned!`:
/// interpolated tokens keep their own spans, and a path spanned half at the derive and half at
/// the user's attribute makes rustc report one mistake twice, once at each.
pub(crate) fn root_at(root: &syn::Path, span: Span) -> TokenStream {
    root.to_token_stream()
        .into_iter()
        .map(|mut t| {
            t.set_span(span);
            t
        })
        .collect()
}

/// Expansion snapshots: what each derive generates for a typical input. Review a change with
/// `cargo insta review` (or `INSTA_UPDATE=always`), then read the new `.snap` before committing.
#[cfg(test)]
mod tests {
    use syn::{DeriveInput, parse_quote};

    fn pretty(tokens: proc_macro2::TokenStream) -> String {
        match syn::parse2::<syn::File>(tokens.clone()) {
            Ok(file) => prettyplease::unparse(&file),
            Err(e) => panic!("the expansion does not parse ({e}):\n{tokens}"),
        }
    }

    #[test]
    fn event_with_every_rule() {
        let input: DeriveInput = parse_quote! {
            #[serde(rename_all = "camelCase")]
            #[outbox(event_type = "notification.feishu.requested", version = 2, service = "notification",
                     key = user_id, aggregate = preview_key(), validate = check_card)]
            pub struct FeishuRequested {
                #[outbox(validate(range(min = 1, max = 9_000_000)))]
                pub user_id: u64,
                #[outbox(validate(non_empty, length(max = 64), regex = "[a-z0-9-]+"))]
                pub preview_id: String,
                #[serde(rename = "url")]
                #[outbox(validate(custom = crate::checks::in_app_link))]
                pub target_url: String,
                #[outbox(validate(nested))]
                pub card: Card,
                pub note: Option<String>,
            }
        };
        insta::assert_snapshot!(pretty(super::event::derive(
            &input,
            crate::ast::Root::Runtime
        )));
    }

    #[test]
    fn service_with_two_versions() {
        let input: DeriveInput = parse_quote! {
            #[outbox(service = "notification", topic = "smartflow.notification.outbox")]
            pub enum NotificationEvents {
                /// The plain-text message.
                FeishuRequested(FeishuRequested),
                #[outbox(handler = on_card)]
                FeishuRequestedV2(v2::FeishuRequested),
            }
        };
        insta::assert_snapshot!(pretty(super::service::derive(
            &input,
            crate::ast::Root::Runtime
        )));
    }

    #[test]
    fn nested_validate() {
        let input: DeriveInput = parse_quote! {
            pub struct CardAction {
                #[outbox(validate(non_empty, length(max = 20)))]
                pub label: String,
                pub url: String,
            }
        };
        insta::assert_snapshot!(pretty(super::validate::derive(
            &input,
            crate::ast::Root::Runtime
        )));
    }

    #[test]
    fn errors_come_with_a_stub() {
        let input: DeriveInput = parse_quote! {
            #[outbox(event_type = "Feishu", version = 0, service = "notification", topc = "x")]
            pub struct FeishuRequested {
                pub user_id: u64,
            }
        };
        let out = super::event::derive(&input, crate::ast::Root::Runtime).to_string();
        // Every mistake, then a stub impl so that uses of the type do not add errors.
        for expected in [
            "is not `lower.dotted.words`",
            "versions start at 1",
            "unknown outbox attribute `topc` on an event",
            "impl :: outbox_runtime :: OutboxEvent for FeishuRequested",
        ] {
            assert!(out.contains(expected), "missing {expected:?} in {out}");
        }
    }

    /// Every path of the generated code starts at the root: the crate the derive came through
    /// (`outbox_runtime`, `outbox_contract`), or `crate = "..."`; never another crate.
    #[test]
    fn generated_paths_start_at_the_chosen_root() {
        use crate::ast::Root;
        let event: DeriveInput = parse_quote! {
            #[outbox(event_type = "ledger.entry.posted", version = 1, service = "ledger", key = account)]
            pub struct EntryPosted {
                #[outbox(validate(non_empty, length(max = 9), range(min = 1)))]
                pub account: String,
            }
        };
        let service: DeriveInput = parse_quote! {
            #[outbox(service = "ledger")]
            pub enum LedgerEvents { EntryPosted(EntryPosted) }
        };
        let roots = |tokens: proc_macro2::TokenStream| {
            let text = tokens.to_string();
            ["outbox_runtime", "outbox_contract", "my_facade"]
                .into_iter()
                .filter(|r| {
                    text.contains(&format!(":: {r} ::"))
                        || text.contains(&format!("{r} :: outbox ::"))
                })
                .collect::<Vec<_>>()
        };
        let with_crate = |mut input: DeriveInput| {
            input
                .attrs
                .push(parse_quote!(#[outbox(crate = "::my_facade::outbox")]));
            input
        };
        for (root, want) in [
            (Root::Runtime, "outbox_runtime"),
            (Root::Contract, "outbox_contract"),
        ] {
            assert_eq!(roots(super::event::derive(&event, root)), [want]);
            assert_eq!(roots(super::service::derive(&service, root)), [want]);
            assert_eq!(roots(super::validate::derive(&event, root)), [want]);
            assert_eq!(
                roots(super::event::derive(&with_crate(event.clone()), root)),
                ["my_facade"]
            );
            assert_eq!(
                roots(super::service::derive(&with_crate(service.clone()), root)),
                ["my_facade"]
            );
        }
    }

    #[test]
    fn crate_must_be_a_path() {
        let input: DeriveInput = parse_quote! {
            #[outbox(crate = "not a path", service = "ledger")]
            pub enum LedgerEvents { EntryPosted(EntryPosted) }
        };
        let out = super::service::derive(&input, crate::ast::Root::Runtime).to_string();
        assert!(
            out.contains("`crate` takes a path to `outbox_runtime` or `outbox_contract`"),
            "{out}"
        );
    }
}
