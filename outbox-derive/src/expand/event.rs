//! `#[derive(OutboxEvent)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{Data, DeriveInput};

use crate::ast::{self, Event, Root};
use crate::attr::Accessor;
use crate::ctxt::Ctxt;
use crate::expand::root_at;
use crate::expand::validate::validate_impl;

pub(crate) fn derive(input: &DeriveInput, root: Root) -> TokenStream {
    let mut cx = Ctxt::default();
    let event = ast::event(&mut cx, input, root);
    match (cx.check(), event) {
        (Ok(()), Some(event)) => expand(&event),
        (checked, other) => {
            let errors = checked.err().unwrap_or_default();
            let root = other.map_or_else(|| root.path(), |e| e.body.root);
            let stub = fallback(input, &root);
            quote!(#errors #stub)
        }
    }
}

pub(crate) fn expand(ev: &Event<'_>) -> TokenStream {
    let ident = ev.ident;
    let root = &ev.body.root;
    let (event_type, version, service) = (&ev.event_type, ev.version, &ev.service);
    let key = accessor(root, ev.key.as_ref());
    let key_name = ev.key.as_ref().map(|k| match k {
        Accessor::Field(f) => syn::ext::IdentExt::unraw(f).to_string(),
        Accessor::Method(m) => format!("{}()", syn::ext::IdentExt::unraw(m)),
    });
    let key_const = key_name.map(|k| quote!(const KEY: ::core::option::Option<&'static str> = ::core::option::Option::Some(#k);));
    let aggregate = ev.aggregate.as_ref().map(|a| {
        let get = accessor(root, Some(a));
        quote! {
            fn aggregate_id(&self) -> ::core::option::Option<::std::string::String> {
                #get
            }
        }
    });
    let validate = validate_impl(&ev.body);
    // The impl header carries the struct's span: when the payload is not `Serialize`,
    // `Deserialize` or `JsonSchema`, the error underlines the struct's name.
    let header = {
        let root = root_at(root, ident.span());
        quote_spanned!(ident.span()=> impl #root::OutboxEvent for #ident)
    };
    quote! {
        #[automatically_derived]
        #header {
            const EVENT_TYPE: &'static str = #event_type;
            const VERSION: u32 = #version;
            const SERVICE: &'static str = #service;
            #key_const

            fn message_key(&self) -> ::core::option::Option<::std::string::String> {
                #key
            }
            #aggregate
        }

        #validate
    }
}

/// `self.field` or `self.method()`, as a key. The call carries the span of the name written
/// in the attribute, so a type that cannot be a key is reported there.
fn accessor(root: &syn::Path, acc: Option<&Accessor>) -> TokenStream {
    match acc {
        None => quote!(::core::option::Option::None),
        Some(Accessor::Field(f)) => {
            let root = root_at(root, f.span());
            quote_spanned! {f.span()=>
                #root::event::ToKey::to_key(&self.#f)
            }
        }
        Some(Accessor::Method(m)) => {
            let root = root_at(root, m.span());
            quote_spanned! {m.span()=>
                #root::event::ToKey::to_key(&self.#m())
            }
        }
    }
}

/// After an error, a stub impl for structs, so that using the type elsewhere (in a service enum,
/// in `enqueue`) does not add a cascade of "not an outbox event" errors to the real one.
fn fallback(input: &DeriveInput, root: &syn::Path) -> TokenStream {
    if !matches!(input.data, Data::Struct(_)) || !input.generics.params.is_empty() {
        return TokenStream::new();
    }
    let ident = &input.ident;
    quote! {
        #[automatically_derived]
        impl #root::OutboxEvent for #ident {
            const EVENT_TYPE: &'static str = "";
            const VERSION: u32 = 0;
            const SERVICE: &'static str = "";
            fn message_key(&self) -> ::core::option::Option<::std::string::String> {
                ::core::unimplemented!()
            }
        }
        #[automatically_derived]
        impl #root::Validate for #ident {
            fn validate_into(&self, _: &str, _: &mut #root::Violations) {}
        }
    }
}
