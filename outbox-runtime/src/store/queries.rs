//! The store's SQL: named queries read from the `.sql` files beside this module, with the
//! table name and the dialect's placeholders filled in.

use std::collections::HashMap;

use super::COLUMNS;

/// A bound parameter.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// An integer.
    I64(i64),
    /// Text.
    Str(String),
    /// Nullable text.
    OptStr(Option<String>),
    /// A nullable integer.
    OptI64(Option<i64>),
}

const COMMON: &str = include_str!("queries/common.sql");

/// The queries shared by every dialect followed by the dialect's own, as `name -> SQL` with
/// `{table}` and `{columns}` filled in and, for `?` dialects, each `$n` turned into `?`.
pub(super) fn for_table(
    dialect: &'static str,
    table: &str,
    numbered: bool,
) -> HashMap<&'static str, String> {
    let columns = COLUMNS.join(", ");
    let o_columns = COLUMNS.map(|c| format!("o.{c}")).join(", ");
    let wake_key = wake_key(table).to_string();
    let mut out = HashMap::new();
    for (name, sql) in parse(COMMON).into_iter().chain(parse(dialect)) {
        let sql = sql
            .replace("{wake_key}", &wake_key)
            .replace("{table}", table)
            .replace("{o.columns}", &o_columns)
            .replace("{columns}", &columns);
        let sql = if numbered { sql } else { unnumber(&sql) };
        out.insert(name, sql);
    }
    out
}

/// The advisory-lock key of a table's wake-up protocol (PostgreSQL): FNV-1a of the table name,
/// the same in every process.
fn wake_key(table: &str) -> i64 {
    let hash = fnv1a(format!("outbox-wake:{table}").as_bytes());
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// FNV-1a: a hash that is the same in every process and every version, for names.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Splits a file of `-- name: x` sections into `(name, SQL)`, dropping comment lines.
fn parse(file: &'static str) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for line in file.lines() {
        if let Some(name) = line.strip_prefix("-- name: ") {
            out.push((name.trim(), String::new()));
        } else if line.trim_start().starts_with("--") || line.trim().is_empty() {
            continue;
        } else if let Some((_, sql)) = out.last_mut() {
            if !sql.is_empty() {
                sql.push('\n');
            }
            sql.push_str(line);
        }
    }
    out
}

/// `sql` with each `$n` placeholder (a `$` followed by digits) written by `write`, given the
/// placeholder's text, and everything else copied, in one pass over `sql` (what `write` puts
/// in is not read again).
fn rewrite_placeholders(sql: &str, mut write: impl FnMut(&mut String, &str)) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 1);
        let (placeholder, after) = rest[at..].split_at(1 + digits);
        if digits == 0 {
            out.push('$');
        } else {
            write(&mut out, placeholder);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `sql` (PostgreSQL's spelling) with each `$n` placeholder replaced by `args[n - 1]` written
/// as a literal: a statement for a simple query, which takes no parameters. A placeholder with
/// no argument stays.
pub(super) fn inline(sql: &str, args: &[Arg]) -> String {
    rewrite_placeholders(sql, |out, placeholder| {
        match placeholder[1..]
            .parse::<usize>()
            .ok()
            .and_then(|n| args.get(n.checked_sub(1)?))
        {
            Some(arg) => literal(out, arg),
            None => out.push_str(placeholder),
        }
    })
}

/// Writes `arg` as a PostgreSQL literal of the type it is bound as: `BIGINT`, or text as an
/// escape string (`E'...'`), whose backslashes are escapes whatever
/// `standard_conforming_strings` says, so that doubling every backslash and quote is the whole
/// of the quoting.
fn literal(out: &mut String, arg: &Arg) {
    use std::fmt::Write as _;
    match arg {
        Arg::I64(v) | Arg::OptI64(Some(v)) => {
            let _ = write!(out, "CAST({v} AS BIGINT)");
        }
        Arg::OptI64(None) => out.push_str("CAST(NULL AS BIGINT)"),
        Arg::OptStr(None) => out.push_str("CAST(NULL AS TEXT)"),
        Arg::Str(text) | Arg::OptStr(Some(text)) => {
            out.push_str("CAST(E'");
            for c in text.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\'' => out.push_str("''"),
                    c => out.push(c),
                }
            }
            out.push_str("' AS TEXT)");
        }
    }
}

/// `$3` → `?`. Valid because each parameter appears once, in binding order.
pub(super) fn unnumber(sql: &str) -> String {
    rewrite_placeholders(sql, |out, _| out.push('?'))
}

/// `sql` with `{ids}` replaced by a placeholder for each of `ids`, which it appends to `args`
/// (bound after what `args` holds), padded to the next power of two by repeating the last one.
///
/// A statement's text is what drivers prepare and cache, and the server plans, once per
/// connection: one text per batch length made nearly every batch of the relay and the
/// consumers prepare and plan a statement of hundreds of placeholders anew (the caches hold
/// 100 texts). Padded, a query has at most 11 texts. An id twice in `IN (...)` selects,
/// locks and changes its row once.
pub(super) fn with_ids(
    sql: &str,
    numbered: bool,
    args: &mut Vec<Arg>,
    ids: impl IntoIterator<Item = Arg>,
) -> String {
    let before = args.len();
    let n = push_ids(args, ids);
    expand_ids(sql, before, n, numbered)
}

/// Replaces `{id_ranges}` with one `id BETWEEN lo AND hi` per run of consecutive ids, or-ed
/// (each run's first and last id bound after what `args` holds), its runs padded to the next
/// power of two by repeating the last one, as [`with_ids`] pads its list.
///
/// Each value of an `IN` list is a descent of the primary key from its root, and a table a
/// level deeper makes each one dearer; a run of consecutive ids read as a range descends once.
/// The ids need not be sorted nor distinct. With none, the condition is false.
pub(super) fn with_id_ranges(
    sql: &str,
    numbered: bool,
    args: &mut Vec<Arg>,
    ids: &[i64],
) -> String {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(id) => *hi = id,
            _ => runs.push((id, id)),
        }
    }
    pad_from(&mut runs, 0);
    let mut text = Vec::with_capacity(runs.len());
    for (lo, hi) in runs {
        args.extend([Arg::I64(lo), Arg::I64(hi)]);
        text.push(if numbered {
            format!("id BETWEEN ${} AND ${}", args.len() - 1, args.len())
        } else {
            "id BETWEEN ? AND ?".to_owned()
        });
    }
    let condition = if text.is_empty() {
        "1 = 0".to_owned()
    } else {
        format!("({})", text.join(" OR "))
    };
    sql.replace("{id_ranges}", &condition)
}

/// `{id_ranges}` as a list of the ids instead, `id IN (...)`, and `{ids}` as the list itself
/// ([`with_ids`]).
pub(super) fn with_id_list(sql: &str, numbered: bool, args: &mut Vec<Arg>, ids: &[i64]) -> String {
    let sql = sql.replace("{id_ranges}", "id IN ({ids})");
    with_ids(&sql, numbered, args, ids.iter().map(|&id| Arg::I64(id)))
}

/// Appends `ids` to `args`, padded to the next power of two with the last one; returns how
/// many it appended.
fn push_ids(args: &mut Vec<Arg>, ids: impl IntoIterator<Item = Arg>) -> usize {
    let start = args.len();
    args.extend(ids);
    pad_from(args, start);
    args.len() - start
}

/// Pads what `items` holds after `start` to the next power of two by repeating its last item:
/// a list's padding for a statement with few texts (see [`with_ids`]).
pub(super) fn pad_from<T: Clone>(items: &mut Vec<T>, start: usize) {
    let n = items.len().saturating_sub(start);
    if let Some(last) = items.last().cloned().filter(|_| n > 0) {
        items.resize(start + n.next_power_of_two(), last);
    }
}

/// Replaces `{ids}` with `n` placeholders numbered after the first `before`.
fn expand_ids(sql: &str, before: usize, n: usize, numbered: bool) -> String {
    let list: Vec<String> = (1..=n)
        .map(|i| {
            if numbered {
                format!("${}", before + i)
            } else {
                "?".to_owned()
            }
        })
        .collect();
    sql.replace("{ids}", &list.join(", "))
}

/// The statements that create an outbox table and its indexes, table first.
pub(super) fn ddl(queries: &HashMap<&'static str, String>) -> Vec<String> {
    let mut names: Vec<&&str> = queries
        .keys()
        .filter(|k| **k == "create_table" || k.starts_with("index_"))
        .collect();
    names.sort_by_key(|k| (**k != "create_table", **k));
    names.into_iter().map(|k| queries[*k].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every dialect's queries (each backend's `QUERIES`, whatever features this build has).
    const DIALECTS: [&str; 3] = [
        include_str!("queries/postgres.sql"),
        include_str!("queries/mysql.sql"),
        include_str!("queries/sqlite.sql"),
    ];

    /// `sql` with every run of white space made one space.
    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn inlined_arguments_are_literals_of_their_type_and_are_not_read_again() {
        let args = [
            Arg::Str(r"it's $2 \ b".into()),
            Arg::I64(-7),
            Arg::OptStr(None),
            Arg::OptI64(Some(3)),
            Arg::OptI64(None),
            Arg::OptStr(Some(String::new())),
        ];
        assert_eq!(
            inline("f($1, $2), g($3, $4, $5, $6), $7 $ $0 '$'", &args),
            "f(CAST(E'it''s $2 \\\\ b' AS TEXT), CAST(-7 AS BIGINT)), g(CAST(NULL AS TEXT), \
             CAST(3 AS BIGINT), CAST(NULL AS BIGINT), CAST(E'' AS TEXT)), $7 $ $0 '$'"
        );
        assert_eq!(
            inline("$2$1", &args[..2]),
            format!("{}{}", inline("$2", &args), inline("$1", &args))
        );
        assert_eq!(inline("no placeholders", &args), "no placeholders");
    }

    #[test]
    fn placeholders_follow_the_dialect() {
        assert_eq!(
            unnumber("a = $1 AND b IN ($2, $10)"),
            "a = ? AND b IN (?, ?)"
        );
        assert_eq!(expand_ids("x IN ({ids})", 3, 2, true), "x IN ($4, $5)");
        assert_eq!(expand_ids("x IN ({ids})", 3, 2, false), "x IN (?, ?)");
    }

    #[test]
    fn id_lists_are_padded_to_a_power_of_two_with_their_last_id() {
        let mut args = vec![Arg::Str("owner".into())];
        assert_eq!(push_ids(&mut args, [3, 4, 5].map(Arg::I64)), 4);
        assert_eq!(
            args,
            vec![
                Arg::Str("owner".into()),
                Arg::I64(3),
                Arg::I64(4),
                Arg::I64(5),
                Arg::I64(5)
            ]
        );
        let mut args = Vec::new();
        assert_eq!(push_ids(&mut args, (1..=8).map(Arg::I64)), 8);
        assert_eq!(args.len(), 8);
        assert_eq!(push_ids(&mut Vec::new(), [Arg::I64(1)]), 1);
        assert_eq!(push_ids(&mut Vec::new(), std::iter::empty()), 0);
        let lengths: std::collections::BTreeSet<usize> = (1..=1024)
            .map(|n| push_ids(&mut Vec::new(), (0..n).map(Arg::I64)))
            .collect();
        assert_eq!(lengths.len(), 11);
        let mut events = vec!["a", "b", "c"];
        pad_from(&mut events, 0);
        assert_eq!(events, ["a", "b", "c", "c"]);
        let mut args = vec![Arg::I64(0)];
        assert_eq!(
            with_ids(
                "x = $1 AND y IN ({ids})",
                true,
                &mut args,
                [7, 8, 9].map(Arg::I64)
            ),
            "x = $1 AND y IN ($2, $3, $4, $5)"
        );
        assert_eq!(args.len(), 5);
    }

    #[test]
    fn id_ranges_are_the_runs_of_consecutive_ids_padded_to_a_power_of_two() {
        let sql = "SELECT id FROM t WHERE s = ? AND {id_ranges}";
        // Unsorted, with a repeat: the runs 3..=5, 9, 11..=12, the last repeated to four.
        let mut args = vec![Arg::Str("sending".into())];
        let got = with_id_ranges(sql, false, &mut args, &[12, 4, 9, 3, 5, 11, 4]);
        assert_eq!(
            got,
            "SELECT id FROM t WHERE s = ? AND (id BETWEEN ? AND ? OR id BETWEEN ? AND ? \
             OR id BETWEEN ? AND ? OR id BETWEEN ? AND ?)"
        );
        let bounds: Vec<i64> = args[1..]
            .iter()
            .map(|a| match a {
                Arg::I64(v) => *v,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(bounds, [3, 5, 9, 9, 11, 12, 11, 12]);
        // A batch of one run, as a hot key's is: one range, numbered after what came first.
        let mut args = vec![Arg::I64(0)];
        let ids: Vec<i64> = (100..600).collect();
        assert_eq!(
            with_id_ranges("x = $1 AND {id_ranges}", true, &mut args, &ids),
            "x = $1 AND (id BETWEEN $2 AND $3)"
        );
        assert_eq!(args, [0, 100, 599].map(Arg::I64));
        // The extremes do not overflow, and nothing selects nothing.
        let mut args = Vec::new();
        with_id_ranges(
            "{id_ranges}",
            false,
            &mut args,
            &[i64::MAX, i64::MAX - 1, i64::MIN],
        );
        assert_eq!(
            args,
            [i64::MIN, i64::MIN, i64::MAX - 1, i64::MAX].map(Arg::I64)
        );
        assert_eq!(
            with_id_ranges("{id_ranges}", false, &mut Vec::new(), &[]),
            "1 = 0"
        );
        // Any set of up to 1,024 ids gives one of 11 texts.
        let texts: std::collections::BTreeSet<String> = (1..=1024_i64)
            .map(|n| {
                let ids: Vec<i64> = (0..n).map(|i| i * 2).collect();
                with_id_ranges("{id_ranges}", false, &mut Vec::new(), &ids)
            })
            .collect();
        assert_eq!(texts.len(), 11);
        // The same statement as a list of the ids.
        let mut args = vec![Arg::Str("sending".into())];
        assert_eq!(
            with_id_list(sql, false, &mut args, &[4, 3, 5]),
            "SELECT id FROM t WHERE s = ? AND id IN (?, ?, ?, ?)"
        );
        assert_eq!(args[1..], [4, 3, 5, 5].map(Arg::I64));
        // A statement written with `{ids}` (PostgreSQL's, SQLite's) is its list either way.
        let mut args = vec![Arg::I64(0)];
        assert_eq!(
            with_id_list("x = $1 AND id IN ({ids})", true, &mut args, &[9, 8]),
            "x = $1 AND id IN ($2, $3)"
        );
        assert_eq!(args, [0, 9, 8].map(Arg::I64));
    }

    #[test]
    fn every_dialect_has_every_query() {
        let needed = [
            "create_table",
            "create_inbox",
            "insert",
            "expire_leases",
            "get_for_update",
            "inbox_insert",
            "purge_consumed",
            "purge_inbox",
            "mark_published",
            "retry_leased",
            "release_leased",
            "claim_window",
            "claim_lock",
            "claim_update",
            "dead_leased",
            "retry_open",
            "dead_open",
            "mark_many_consumed",
            "replay",
            "discard",
            "get",
            "get_by_event_id",
            "list_dead",
            "count_by_status",
            "count_open",
            "oldest_due",
            "dead_by_reason",
        ];
        for dialect in DIALECTS {
            let q = for_table(dialect, "t_outbox", false);
            for name in needed {
                assert!(q.contains_key(name), "missing {name}");
                let filled = q[name].replace("{ids}", "").replace("{id_ranges}", "");
                assert!(
                    !filled.contains('{'),
                    "{name} has an unfilled part: {filled}"
                );
            }
            assert!(ddl(&q)[0].starts_with("CREATE TABLE IF NOT EXISTS t_outbox"));
            for prefix in ["upgrade_", "table_upgrade_"] {
                for check in q
                    .keys()
                    .filter_map(|k| k.strip_prefix(&format!("{prefix}check_")))
                {
                    assert!(
                        q.contains_key(format!("{prefix}{check}").as_str()),
                        "{prefix}check_{check} has no {prefix}{check}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_column_migrate_adds_is_the_column_a_new_table_gets() {
        let mut added = 0;
        for dialect in DIALECTS {
            let q = for_table(dialect, "t_outbox", false);
            let create = words(&q["create_table"]);
            for (name, sql) in q.iter().filter(|(k, _)| k.starts_with("table_upgrade_")) {
                let sql = words(sql);
                let Some(column) = sql.strip_prefix("ALTER TABLE t_outbox ADD COLUMN ") else {
                    continue;
                };
                added += 1;
                assert!(
                    create.contains(&format!("{column},"))
                        || create.contains(&format!("{column})")),
                    "{name} adds `{column}`, which create_table does not define alike"
                );
            }
        }
        // MySQL's `room` at least: the test looks at something.
        assert!(added >= 1);
    }
}
