//! The password a replication stream finds in PostgreSQL's password file, as libpq and sqlx
//! (for the pool's own connections) find it: `PGPASSFILE`, else `~/.pgpass`, a line
//! `host:port:database:user:password` whose first four fields match (`*` matches anything;
//! `\:` and `\\` stand for `:` and `\`). sqlx reads the file for the pool but does not give the
//! password back, so the stream reads it again.

use std::path::{Path, PathBuf};

use super::ReplicationTarget;

/// The password file's password for `target`; `None` without a file, a matching line, or
/// when the file can be read by others than its owner (libpq ignores such a file).
pub(super) fn password(target: &ReplicationTarget) -> Option<String> {
    let path = file()?;
    let contents = read_private(&path)?;
    lookup(&contents, target)
}

fn file() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PGPASSFILE") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".pgpass"))
}

/// The file's text, unless its group or others may read or write it.
fn read_private(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the password file is readable by others than its owner: not read (chmod 0600)"
            );
            return None;
        }
    }
    std::fs::read_to_string(path).ok()
}

/// The password of the first line of `contents` that matches `target`. A target on a Unix
/// socket matches the host `localhost`, as libpq has it.
fn lookup(contents: &str, target: &ReplicationTarget) -> Option<String> {
    let host = if target.host.starts_with('/') {
        "localhost"
    } else {
        target.host.as_str()
    };
    let port = target.port.to_string();
    let wanted = [host, port.as_str(), &target.database, &target.user];
    contents
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields = split(line);
            let [h, p, d, u, password] = <[String; 5]>::try_from(fields).ok()?;
            [h, p, d, u]
                .iter()
                .zip(wanted)
                .all(|(field, want)| field == "*" || field == want)
                .then_some(password)
        })
}

/// A line's fields: four split at unescaped colons, the fifth the rest; escapes removed.
fn split(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> ReplicationTarget {
        ReplicationTarget {
            host: host.into(),
            port: 5432,
            user: "relay".into(),
            password: None,
            database: "app".into(),
            tls: false,
        }
    }

    #[test]
    fn the_first_matching_line_gives_the_password_with_its_escapes_read() {
        let file = "\
# comments are skipped
db.example:5432:other:relay:not-this-database
db.example:6543:app:relay:not-this-port
db.example:5432:app:someone:not-this-user
db.example:*:app:relay:p\\:a\\\\ss:with:colons
*:*:*:*:too-late
";
        assert_eq!(
            lookup(file, &target("db.example")).as_deref(),
            Some("p:a\\ss:with:colons")
        );
        assert_eq!(
            lookup(file, &target("elsewhere")).as_deref(),
            Some("too-late")
        );
        assert_eq!(
            lookup("db.example:5432:app:relay", &target("db.example")),
            None
        );
        assert_eq!(lookup("", &target("db.example")), None);
        // A Unix socket is `localhost`.
        assert_eq!(
            lookup(
                "localhost:5432:app:relay:sock",
                &target("/var/run/postgresql")
            )
            .as_deref(),
            Some("sock")
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_file_others_can_read_is_ignored() {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::env::temp_dir().join(format!("outbox-pgpass-{}", std::process::id()));
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_private(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private(&path).as_deref(), Some("*:*:*:*:secret\n"));
        std::fs::remove_file(&path).unwrap();
    }
}
