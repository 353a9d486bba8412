//! `#[derive(OutboxService)]`: the `OutboxService` impl, the handler trait, the `Dispatch` impl,
//! and the compile-time checks that tie the variants to the service.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, LitStr};

use crate::ast::{self, Root, Service};
use crate::ctxt::Ctxt;
use crate::expand::root_at;

pub(crate) fn derive(input: &DeriveInput, root: Root) -> TokenStream {
    let mut cx = Ctxt::default();
    let service = ast::service(&mut cx, input, root);
    match (cx.check(), service) {
        (Ok(()), Some(s)) => expand(&s),
        (checked, other) => {
            let errors = checked.err().unwrap_or_default();
            let stub = other.map(|s| fallback(&s, input));
            quote!(#errors #stub)
        }
    }
}

pub(crate) fn expand(s: &Service<'_>) -> TokenStream {
    let imp = service_impl(s);
    let checks = checks(s);
    let handler = handler_trait(s);
    let dispatch = dispatch_impl(s);
    let from = from_impls(s);
    quote! {
        #imp
        #checks
        #handler
        #dispatch
        #from
    }
}

/// `<Ty as ::root::OutboxEvent>`, every token of the root at the payload type's span (see
/// [`root_at`]), as the checks and tables that use it are.
fn event(root: &syn::Path, ty: &syn::Type) -> TokenStream {
    let root = root_at(root, ty.span());
    quote!(<#ty as #root::OutboxEvent>)
}

fn option(lit: Option<&LitStr>) -> TokenStream {
    match lit {
        Some(l) => quote!(::core::option::Option::Some(#l)),
        None => quote!(::core::option::Option::None),
    }
}

fn service_impl(s: &Service<'_>) -> TokenStream {
    let root = &s.root;
    let ident = s.ident;
    let service = &s.service;
    let (table, topic, group) = (
        option(s.table.as_ref()),
        option(s.topic.as_ref()),
        option(s.group.as_ref()),
    );
    let specs = s.variants.iter().map(|v| {
        let ev = event(&s.root, v.ty);
        let payload = v.ty.to_token_stream().to_string().replace(' ', "");
        let variant = syn::ext::IdentExt::unraw(v.ident).to_string();
        let method = syn::ext::IdentExt::unraw(&v.method).to_string();
        quote! {
            #root::route::EventSpec {
                event_type: #ev::EVENT_TYPE,
                version: #ev::VERSION,
                payload: #payload,
                variant: #variant,
                handler: #method,
                key: #ev::KEY,
                schema: #ev::json_schema,
            }
        }
    });
    // Spanned at the payload type, like the checks, so that a type that is not an event is
    // reported once, there.
    let decode = s.variants.iter().map(|v| {
        let (ev, var) = (event(&s.root, v.ty), v.ident);
        quote_spanned! {v.ty.span()=>
            |payload| #ev::from_payload(payload).map(Self::#var)
        }
    });
    let encode = s.variants.iter().map(|v| {
        let (ev, var) = (event(&s.root, v.ty), v.ident);
        quote_spanned! {v.ty.span()=>
            |event| match event {
                Self::#var(event) => #ev::to_payload(event),
                _ => ::core::unreachable!("the variant table and the variants are generated together"),
            }
        }
    });
    let index = s.variants.iter().enumerate().map(|(i, v)| {
        let var = v.ident;
        quote!(Self::#var(_) => #i)
    });
    let arms = |body: TokenStream| {
        let arms = s.variants.iter().map(move |v| {
            let var = v.ident;
            let ev = event(&s.root, v.ty);
            let body = body.clone();
            quote!(Self::#var(__event) => #ev::#body)
        });
        quote!(match self { #(#arms,)* })
    };
    let key = arms(quote!(message_key(__event)));
    let aggregate = arms(quote!(aggregate_id(__event)));
    quote! {
        // A single-variant enum makes the `_` arms of `ENCODE` unreachable.
        #[automatically_derived]
        #[allow(unreachable_patterns)]
        impl #root::OutboxService for #ident {
            const SERVICE: &'static str = #service;
            const ROUTE: #root::route::RouteSpec = #root::route::RouteSpec {
                service: #service,
                table: #table,
                topic: #topic,
                group: #group,
            };
            const EVENTS: &'static [#root::route::EventSpec] = &[#(#specs),*];

            const DECODE: &'static [#root::service::Decoder<Self>] = &[#(#decode),*];
            const ENCODE: &'static [#root::service::Encoder<Self>] = &[#(#encode),*];

            fn variant_index(&self) -> usize {
                match self { #(#index,)* }
            }

            fn message_key(&self) -> ::core::option::Option<::std::string::String> {
                #key
            }

            fn aggregate_id(&self) -> ::core::option::Option<::std::string::String> {
                #aggregate
            }
        }
    }
}

/// Compile-time checks, each failing at the variant it is about:
/// every event belongs to this enum's service, and no (event type, version) appears twice.
fn checks(s: &Service<'_>) -> TokenStream {
    let root = &s.root;
    let ident = s.ident;
    let service = s.service.value();
    let owned = s.variants.iter().map(|v| {
        let ev = event(&s.root, v.ty);
        let msg = format!(
            "the event in variant `{var}` belongs to another service: `{ident}` holds the events of service `{service}`, so `{ty}` needs `service = \"{service}\"` in its `#[outbox(...)]`, or the variant belongs in the enum of the event's own service",
            var = v.ident,
            ty = v.ty.to_token_stream().to_string().replace(' ', ""),
        );
        // An empty service is the stub left by a failed `#[derive(OutboxEvent)]`, whose own error
        // already explains it.
        let root = root_at(root, v.ty.span());
        quote_spanned! {v.ty.span()=>
            ::core::assert!(
                #ev::SERVICE.is_empty() || #root::__private::str_eq(#ev::SERVICE, #service),
                #msg
            );
        }
    });
    let pairs = s.variants.iter().map(|v| {
        let ev = event(&s.root, v.ty);
        quote!((#ev::EVENT_TYPE, #ev::VERSION))
    });
    let unique = s.variants.iter().enumerate().skip(1).map(|(i, v)| {
        let msg = format!(
            "variant `{var}` repeats the event type and version of an earlier variant of `{ident}`; each (event type, version) has one handler, so give `{ty}` a new `version` or remove one of the variants",
            var = v.ident,
            ty = v.ty.to_token_stream().to_string().replace(' ', ""),
        );
        let root = root_at(root, v.ty.span());
        quote_spanned! {v.ty.span()=>
            ::core::assert!(
                __EVENTS[#i].1 == 0 || !#root::__private::repeats_earlier(__EVENTS, #i),
                #msg
            );
        }
    });
    quote! {
        const _: () = {
            #(#owned)*
            const __EVENTS: &[(&str, u32)] = &[#(#pairs),*];
            #(#unique)*
        };
    }
}

fn handler_trait(s: &Service<'_>) -> TokenStream {
    let root = &s.root;
    let (vis, ident, name, service) = (s.vis, s.ident, &s.handler, s.service.value());
    let ctx = ctx_param(s);
    let methods = s.variants.iter().map(|v| {
        let (ty, method, var, docs) = (v.ty, &v.method, v.ident, &v.docs);
        let summary = format!(
            " Handles a `{}` event (variant `{ident}::{var}`).",
            ty.to_token_stream().to_string().replace(' ', "")
        );
        let sep = (!docs.is_empty()).then(|| quote!(#[doc = ""]));
        // The declaration carries the variant's span: when an implementation misses this
        // method, the compiler's "from trait" note points at the variant and its event.
        let root = root_at(root, v.ident.span());
        quote_spanned! {v.ident.span()=>
            #[doc = #summary]
            #sep
            #(#docs)*
            fn #method(
                &self,
                ctx: &mut #ctx,
                event: #ty,
            ) -> impl ::core::future::Future<
                Output = ::core::result::Result<(), #root::HandlerError>,
            > + ::core::marker::Send;
        }
    });
    let doc = format!(
        " Handles every event of service `{service}`: one method per variant of [`{ident}`].\n\n Generated by `#[derive(OutboxService)]`. A consumer of `{ident}` needs an implementation of this trait, so a missing handler is a compile error naming the event. `Ctx` is what the runtime hands each call (for example, the database transaction that also records the event as consumed)."
    );
    quote! {
        #[doc = #doc]
        #vis trait #name<#ctx: ?::core::marker::Sized + ::core::marker::Send>:
            ::core::marker::Send + ::core::marker::Sync
        {
            #(#methods)*
        }
    }
}

/// The handler trait's context parameter: `Ctx`, unless a payload type is called that.
fn ctx_param(s: &Service<'_>) -> syn::Ident {
    let clash = s.variants.iter().any(|v| {
        v.ty.to_token_stream()
            .into_iter()
            .any(|t| matches!(&t, proc_macro2::TokenTree::Ident(i) if i == "Ctx"))
    });
    let name = if clash { "__OutboxCtx" } else { "Ctx" };
    syn::Ident::new(name, proc_macro2::Span::call_site())
}

fn dispatch_impl(s: &Service<'_>) -> TokenStream {
    let root = &s.root;
    let (ident, name) = (s.ident, &s.handler);
    let arms = s.variants.iter().map(|v| {
        let (var, method) = (v.ident, &v.method);
        quote!(Self::#var(__event) => __handler.#method(__ctx, __event).await)
    });
    quote! {
        #[automatically_derived]
        impl<__H, __Ctx> #root::Dispatch<__H, __Ctx> for #ident
        where
            __H: #name<__Ctx> + ?::core::marker::Sized,
            __Ctx: ?::core::marker::Sized + ::core::marker::Send,
        {
            fn dispatch<'__a>(
                self,
                __handler: &'__a __H,
                __ctx: &'__a mut __Ctx,
            ) -> impl ::core::future::Future<
                Output = ::core::result::Result<(), #root::HandlerError>,
            > + ::core::marker::Send + '__a {
                async move {
                    match self { #(#arms,)* }
                }
            }
        }
    }
}

/// `From<Event> for Enum`, so that an event can be passed where the service's enum is expected,
/// and `Listed for Event`, which `enqueue` requires: an event no enum lists cannot be stored, and
/// an event listed in a second enum is a conflicting implementation, reported at that enum's
/// variant. Both are left out when a payload type appears twice in this enum: that is a
/// duplicate, reported by `checks`.
fn from_impls(s: &Service<'_>) -> TokenStream {
    let (ident, root) = (s.ident, &s.root);
    let names: Vec<String> = s
        .variants
        .iter()
        .map(|v| v.ty.to_token_stream().to_string())
        .collect();
    let impls = s.variants.iter().enumerate().filter_map(|(i, v)| {
        if names.iter().filter(|n| **n == names[i]).count() > 1 {
            return None;
        }
        let (ty, var) = (v.ty, v.ident);
        // Spanned at the payload type, attribute included (an impl's span starts at its first
        // attribute), so that a second enum listing the event is reported at its variant.
        let listed = {
            let root = root_at(root, v.ty.span());
            quote_spanned! {v.ty.span()=>
                #[automatically_derived]
                impl #root::Listed for #ty {
                    type Service = #ident;
                }
            }
        };
        Some(quote! {
            #[automatically_derived]
            impl ::core::convert::From<#ty> for #ident {
                fn from(event: #ty) -> Self {
                    Self::#var(event)
                }
            }
            #listed
        })
    });
    quote!(#(#impls)*)
}

/// After an error in the attributes, the handler trait and a stub `OutboxService`, so that the
/// user's `impl ...Handler for ...` and `.service::<Enum>()` still resolve and the real error
/// stands alone.
fn fallback(s: &Service<'_>, input: &DeriveInput) -> TokenStream {
    let root = &s.root;
    if !matches!(input.data, Data::Enum(_)) {
        return TokenStream::new();
    }
    let ident = s.ident;
    let handler = handler_trait(s);
    quote! {
        #handler
        #[automatically_derived]
        impl #root::OutboxService for #ident {
            const SERVICE: &'static str = "";
            const ROUTE: #root::route::RouteSpec = #root::route::RouteSpec {
                service: "",
                table: ::core::option::Option::None,
                topic: ::core::option::Option::None,
                group: ::core::option::Option::None,
            };
            const EVENTS: &'static [#root::route::EventSpec] = &[];
            const DECODE: &'static [#root::service::Decoder<Self>] = &[];
            const ENCODE: &'static [#root::service::Encoder<Self>] = &[];
            fn variant_index(&self) -> usize {
                ::core::unimplemented!("the derive failed")
            }
            fn message_key(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::None
            }
            fn aggregate_id(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::None
            }
        }
    }
}
