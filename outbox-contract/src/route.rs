//! Routing: which table, topic and consumer group carry a service's events.
//!
//! There is one resolution rule, used by writers, relays and consumers alike (the Go system's
//! bug B2 came from having two): for each of table, topic and group,
//! 1. an override in the runtime [`RouteConfig`] wins, so operators can move a service
//!    without a rebuild;
//! 2. else the override on the service's `#[outbox(...)]` attribute;
//! 3. else the convention: table `<service with - as _>_outbox`, topic
//!    `<prefix>.<service>.outbox`, group `<prefix>-<service>-outbox-consumer`.
//!
//! ```
//! use outbox_contract::route::{RouteConfig, RouteSpec};
//!
//! let spec = RouteSpec { service: "active-scheduler", table: None, topic: None, group: None };
//! let route = RouteConfig::new().resolve(&spec);
//! assert_eq!(route.table, "active_scheduler_outbox");
//! assert_eq!(route.topic, "outbox.active-scheduler.outbox");
//! assert_eq!(route.group, "outbox-active-scheduler-outbox-consumer");
//! ```

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::error::Error;
use crate::service::OutboxService;
pub use crate::service::{EventSpec, RouteSpec};

/// The topic and group prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "outbox";

/// Where a service's events live, once resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRoute {
    /// The owning (consuming) service.
    pub service: String,
    /// Its outbox table.
    pub table: String,
    /// Its Kafka topic.
    pub topic: String,
    /// Its consumer group.
    pub group: String,
}

/// An operator's override of one service's route; unset parts keep the attribute or the
/// convention.
///
/// Built with its setters (`RouteOverride::default().table("billing_outbox")`) or read from
/// configuration; new parts can be added without breaking either.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouteOverride {
    /// Table name: `[a-z_][a-z0-9_]*`, at most 57 characters.
    pub table: Option<String>,
    /// Kafka topic: `[A-Za-z0-9._-]`, at most 249 characters.
    pub topic: Option<String>,
    /// Consumer group: not blank, at most 255 characters.
    pub group: Option<String>,
}

impl RouteOverride {
    /// Sets the table name.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// Sets the Kafka topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Sets the consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// Runtime routing configuration: the prefix and per-service overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    prefix: String,
    overrides: BTreeMap<String, RouteOverride>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteConfig {
    /// The convention with prefix [`DEFAULT_PREFIX`] and no overrides.
    pub fn new() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            overrides: BTreeMap::new(),
        }
    }

    /// Sets the topic and group prefix (the Go system used `smartflow`).
    pub fn prefix(mut self, prefix: &str) -> Result<Self, Error> {
        check_topic(prefix).map_err(|reason| Error::InvalidName {
            what: "prefix",
            name: prefix.to_owned(),
            reason,
        })?;
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// Overrides parts of one service's route; each given name is checked.
    pub fn override_service(mut self, service: &str, over: RouteOverride) -> Result<Self, Error> {
        let checks: [(&'static str, &Option<String>, NameRule); 3] = [
            ("table", &over.table, check_table),
            ("topic", &over.topic, check_topic),
            ("group", &over.group, check_group),
        ];
        for (what, value, check) in checks {
            if let Some(name) = value {
                check(name).map_err(|reason| Error::InvalidName {
                    what,
                    name: name.clone(),
                    reason,
                })?;
            }
        }
        self.overrides.insert(service.to_owned(), over);
        Ok(self)
    }

    /// Resolves a service's route by the one rule in the [module docs](self).
    pub fn resolve(&self, spec: &RouteSpec) -> ServiceRoute {
        let over = self.overrides.get(spec.service);
        let pick = |runtime: Option<&String>, attr: Option<&str>, convention: String| {
            runtime
                .cloned()
                .or_else(|| attr.map(str::to_owned))
                .unwrap_or(convention)
        };
        let service = spec.service;
        ServiceRoute {
            service: service.to_owned(),
            table: pick(
                over.and_then(|o| o.table.as_ref()),
                spec.table,
                format!("{}_outbox", service.replace('-', "_")),
            ),
            topic: pick(
                over.and_then(|o| o.topic.as_ref()),
                spec.topic,
                format!("{}.{service}.outbox", self.prefix),
            ),
            group: pick(
                over.and_then(|o| o.group.as_ref()),
                spec.group,
                format!("{}-{service}-outbox-consumer", self.prefix),
            ),
        }
    }
}

/// A naming rule: `Err(reason)` when a name breaks it.
type NameRule = fn(&str) -> Result<(), String>;

/// One row of the route table: an (event type, version) and where it goes.
#[derive(Debug, Clone)]
pub struct Route {
    /// The event's type.
    pub event_type: &'static str,
    /// The event's version.
    pub version: u32,
    /// The accepting service's route.
    pub route: ServiceRoute,
    /// The event as declared on the service enum.
    pub spec: EventSpec,
}

/// The route table of a set of services: every (event type, version) to its service, table,
/// topic and consumer group.
///
/// Built once from explicitly listed services (no link-time registry that silently drops an
/// unreferenced crate). Building fails, instead of overwriting as the Go system did (bug B13),
/// when two services claim one event type or when two services would share a table or topic.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    services: BTreeMap<&'static str, ServiceRoute>,
    events: BTreeMap<(&'static str, u32), Route>,
    owners: BTreeMap<&'static str, &'static str>,
    /// The enum that lists each service's events (by type name), for the services added with
    /// [`CatalogBuilder::service`].
    enums: BTreeMap<&'static str, &'static str>,
}

impl Catalog {
    /// Starts an empty catalog.
    pub fn builder(config: RouteConfig) -> CatalogBuilder {
        CatalogBuilder {
            config,
            catalog: Catalog::default(),
        }
    }

    /// The route of a service.
    pub fn service(&self, service: &str) -> Option<&ServiceRoute> {
        self.services.get(service)
    }

    /// Every service's route, by service name.
    pub fn services(&self) -> impl Iterator<Item = &ServiceRoute> {
        self.services.values()
    }

    /// The route of one (event type, version).
    pub fn route(&self, event_type: &str, version: u32) -> Option<&Route> {
        let (&k, _) = self.owners.get_key_value(event_type)?;
        self.events.get(&(k, version))
    }

    /// The route of an event type's owning service, whatever the version.
    pub fn service_of(&self, event_type: &str) -> Option<&ServiceRoute> {
        self.services.get(self.owners.get(event_type)?)
    }

    /// Every route, ordered by event type then version.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.events.values()
    }

    /// The type name of the enum that lists `service`'s events, when it was added with
    /// [`CatalogBuilder::service`].
    pub fn enum_of(&self, service: &str) -> Option<&'static str> {
        self.enums.get(service).copied()
    }

    /// Refuses `S` when another enum lists `S`'s service here
    /// ([`Error::ServiceClaimedTwice`], naming both): a consumer typed on `S` would dead-letter
    /// that enum's events as unknown. A service without an enum here (added by name) passes.
    pub fn check_enum<S: OutboxService>(&self) -> Result<(), Error> {
        let this = std::any::type_name::<S>();
        match self.enum_of(S::SERVICE) {
            Some(first) if first != this => Err(Error::ServiceClaimedTwice {
                service: S::SERVICE.to_owned(),
                first,
                second: this,
            }),
            _ => Ok(()),
        }
    }
}

/// Adds services to a [`Catalog`].
#[derive(Debug)]
pub struct CatalogBuilder {
    config: RouteConfig,
    catalog: Catalog,
}

impl CatalogBuilder {
    /// Adds the service `S`; adding the same service twice is a no-op.
    ///
    /// A service's events are the variants of one enum: a second enum claiming the same service
    /// is refused ([`Error::ServiceClaimedTwice`], naming both), because each consumer is typed on
    /// one enum and would dead-letter the other's events as unknown.
    pub fn service<S: OutboxService>(mut self) -> Result<Self, Error> {
        self.catalog.check_enum::<S>()?;
        if self.catalog.enum_of(S::SERVICE).is_some() {
            return Ok(self);
        }
        self = self.add(&S::ROUTE, S::EVENTS)?;
        self.catalog
            .enums
            .insert(S::SERVICE, std::any::type_name::<S>());
        Ok(self)
    }

    /// Adds a service known only by name, with no events: for tools (the `outbox` CLI, a relay
    /// daemon) that move and inspect rows without decoding them. The name follows the same rule
    /// as `#[outbox(service = ...)]`. (The name is leaked to get a `'static` route: a few bytes
    /// per service, once.)
    pub fn service_by_name(self, name: &str) -> Result<Self, Error> {
        check_service(name).map_err(|reason| Error::InvalidName {
            what: "service",
            name: name.to_owned(),
            reason,
        })?;
        let service: &'static str = Box::leak(name.to_owned().into_boxed_str());
        let spec = RouteSpec {
            service,
            table: None,
            topic: None,
            group: None,
        };
        self.add(&spec, &[])
    }

    fn add(mut self, spec: &RouteSpec, events: &'static [EventSpec]) -> Result<Self, Error> {
        let route = self.config.resolve(spec);
        let known = match self.catalog.services.get(spec.service) {
            // A service added by name (a tool's) and then by its enum: the routes must agree.
            Some(existing) if *existing == route => true,
            Some(_) => {
                return Err(Error::DuplicateService {
                    service: spec.service.to_owned(),
                });
            }
            None => false,
        };
        for other in self.catalog.services.values().filter(|_| !known) {
            for (what, a, b) in [
                ("table", &other.table, &route.table),
                ("topic", &other.topic, &route.topic),
            ] {
                if a == b {
                    return Err(Error::SharedRoute {
                        what,
                        name: a.clone(),
                        first: other.service.clone(),
                        second: route.service.clone(),
                    });
                }
            }
        }
        for ev in events {
            match self.catalog.owners.entry(ev.event_type) {
                Entry::Occupied(o) if *o.get() != spec.service => {
                    return Err(Error::EventOwnedTwice {
                        event_type: ev.event_type.to_owned(),
                        first: (*o.get()).to_owned(),
                        second: spec.service.to_owned(),
                    });
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(v) => {
                    v.insert(spec.service);
                }
            }
            self.catalog.events.insert(
                (ev.event_type, ev.version),
                Route {
                    event_type: ev.event_type,
                    version: ev.version,
                    route: route.clone(),
                    spec: *ev,
                },
            );
        }
        self.catalog.services.insert(spec.service, route);
        Ok(self)
    }

    /// The finished catalog.
    pub fn build(self) -> Catalog {
        self.catalog
    }
}

/// Table names become SQL identifiers without quoting, so the rule is strict:
/// `[a-z_][a-z0-9_]*`, at most 57 characters (so that index names, the table's name plus a
/// suffix of up to 6 characters, fit PostgreSQL's 63-character limit).
fn check_table(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err("must match [a-z_][a-z0-9_]*".to_owned());
    }
    if name.len() > 57 {
        return Err(format!("must be at most 57 characters, got {}", name.len()));
    }
    Ok(())
}

/// Service names: `[a-z][a-z0-9-]*`, at most 48 characters (as the derive checks them).
fn check_service(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok || name.len() > 48 {
        return Err("must match [a-z][a-z0-9-]* and be at most 48 characters".to_owned());
    }
    Ok(())
}

/// Kafka's topic rule: `[A-Za-z0-9._-]+`, at most 249 characters, not `.` or `..`.
fn check_topic(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("must not be empty, `.` or `..`".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("contains `{c}`; use only [A-Za-z0-9._-]"));
    }
    if name.len() > 249 {
        return Err(format!(
            "must be at most 249 characters, got {}",
            name.len()
        ));
    }
    Ok(())
}

/// Consumer groups may hold any text, but a blank or control-character group is a mistake.
fn check_group(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be blank".to_owned());
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    if name.len() > 255 {
        return Err(format!(
            "must be at most 255 characters, got {}",
            name.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: RouteSpec = RouteSpec {
        service: "token-store",
        table: Some("tokens_outbox"),
        topic: None,
        group: None,
    };

    #[test]
    fn runtime_override_beats_attribute_beats_convention() {
        let config = RouteConfig::new().prefix("smartflow").unwrap();
        let r = config.resolve(&SPEC);
        assert_eq!(r.table, "tokens_outbox");
        assert_eq!(r.topic, "smartflow.token-store.outbox");
        assert_eq!(r.group, "smartflow-token-store-outbox-consumer");

        let over = RouteOverride {
            table: Some("ts_outbox".into()),
            group: Some("billing".into()),
            ..Default::default()
        };
        let r = config
            .override_service("token-store", over)
            .unwrap()
            .resolve(&SPEC);
        assert_eq!(r.table, "ts_outbox");
        assert_eq!(r.topic, "smartflow.token-store.outbox");
        assert_eq!(r.group, "billing");
    }

    #[test]
    fn overrides_with_unsafe_names_are_refused() {
        let bad_table = RouteOverride {
            table: Some("x; drop table users".into()),
            ..Default::default()
        };
        let err = RouteConfig::new()
            .override_service("task", bad_table)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid table `x; drop table users`: must match [a-z_][a-z0-9_]*"
        );
        let bad_topic = RouteOverride {
            topic: Some("a/b".into()),
            ..Default::default()
        };
        assert!(
            RouteConfig::new()
                .override_service("task", bad_topic)
                .is_err()
        );
        assert!(RouteConfig::new().prefix("").is_err());
        let long = "a".repeat(58);
        assert!(check_table(&long).is_err());
        assert!(check_table(&long[..57]).is_ok());
    }
}
