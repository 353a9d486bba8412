//! Name rules, checked while the macro runs so that a bad name fails `cargo build` with an
//! error under the literal. Each returns the reason a name breaks its rule.

/// Event types are `lower.dotted.words`: two or more dot-separated words of `[a-z][a-z0-9_]*`,
/// at most 128 characters.
/// `notification.feishu.requested` and `active_schedule.triggered` pass; `Notification.Sent`,
/// `feishu` and `chat..sent` do not.
pub(crate) fn event_type(name: &str) -> Result<(), String> {
    if name.len() > 128 {
        return Err(format!(
            "event type is {} characters long; the limit is 128",
            name.len()
        ));
    }
    let words: Vec<&str> = name.split('.').collect();
    let word_ok = |w: &str| {
        let mut chars = w.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if words.len() < 2 || !words.iter().all(|w| word_ok(w)) {
        return Err(format!(
            "event type `{name}` is not `lower.dotted.words`; use two or more dot-separated words of lowercase letters, digits and `_`, each starting with a letter, like `notification.feishu.requested`"
        ));
    }
    Ok(())
}

/// Service names become table, topic and group names, so they are `[a-z][a-z0-9-]*` and at most
/// 48 characters (the table `<service>_outbox` and its index names then fit PostgreSQL's
/// 63-character limit).
/// This is also what keeps them safe to splice into SQL.
/// `token-store` passes; `TokenStore`, `token_store`, `-store` do not.
pub(crate) fn service(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(format!(
            "service name `{name}` must match `[a-z][a-z0-9-]*`: lowercase letters, digits and `-`, starting with a letter, like `token-store`"
        ));
    }
    if name.len() > 48 {
        return Err(format!(
            "service name `{name}` is {} characters long; the limit is 48, so that its table name fits in 63",
            name.len()
        ));
    }
    Ok(())
}

/// Tables are SQL identifiers spliced without quoting: `[a-z_][a-z0-9_]*`, at most 57 characters
/// (index names add up to 6, and PostgreSQL allows 63).
/// `notification_outbox` passes; `Outbox`, `outbox-table`, `x; drop` do not.
pub(crate) fn table(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok || name.len() > 57 {
        return Err(format!(
            "table name `{name}` must match `[a-z_][a-z0-9_]*` and be at most 57 characters, like `notification_outbox`"
        ));
    }
    Ok(())
}

/// Kafka topics: `[A-Za-z0-9._-]`, 1 to 249 characters, not `.` or `..`.
/// `smartflow.notification.outbox` passes; `a topic`, `a/b` do not.
pub(crate) fn topic(name: &str) -> Result<(), String> {
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name == "." || name == ".." || !chars_ok || name.len() > 249 {
        return Err(format!(
            "topic `{name}` must be 1 to 249 characters of `[A-Za-z0-9._-]`, like `smartflow.notification.outbox`"
        ));
    }
    Ok(())
}

/// Consumer groups: not blank, no control characters, at most 255 characters.
pub(crate) fn group(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.chars().any(char::is_control) || name.len() > 255 {
        return Err(format!(
            "consumer group `{name}` must be 1 to 255 characters with no control characters, like `smartflow-notification-outbox-consumer`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types() {
        for ok in [
            "notification.feishu.requested",
            "active_schedule.triggered",
            "a.b2",
        ] {
            assert!(event_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "feishu",
            "Notification.sent",
            "chat..sent",
            ".a.b",
            "a.b.",
            "a.2b",
            "a-b.c",
            "",
        ] {
            assert!(event_type(bad).is_err(), "{bad}");
        }
        assert!(event_type(&format!("a.{}", "b".repeat(127))).is_err());
    }

    #[test]
    fn services() {
        for ok in ["agent", "token-store", "a1", &"a".repeat(48)] {
            assert!(service(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Agent", "token_store", "-a", "1a", &"a".repeat(49)] {
            assert!(service(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes() {
        assert!(table("notification_outbox").is_ok());
        assert!(table("x; drop table t").is_err());
        assert!(topic("smartflow.notification.outbox").is_ok());
        assert!(topic("a/b").is_err());
        assert!(group(" ").is_err());
        assert!(group("smartflow-notification-outbox-consumer").is_ok());
    }
}
