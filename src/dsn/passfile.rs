//! Passwords from a libpq password file (`~/.pgpass`, `PGPASSFILE`, or the DSN's
//! `passfile`), for a DSN that carries none: each line is
//! `hostname:port:database:username:password`, `*` matches anything, `\:` and `\\`
//! escape (libpq docs, "The Password File"). Like libpq, a file that others may read is
//! ignored, with a warning.

use std::path::{Path, PathBuf};

/// Where to look: the DSN's `passfile`, else `PGPASSFILE`, else `~/.pgpass`.
pub fn location(from_dsn: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = from_dsn.filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass"))
}

/// The password the file at `path` gives for this connection, if any.
pub fn lookup(path: &Path, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    passfile = %path.display(),
                    "password file has group or world access; ignored (chmod 0600 it)"
                );
                return None;
            }
        }
    }
    find(&text, host, port, database, user)
}

/// The first matching line's password (pure: the file's text in).
pub fn find(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(fields)
        .filter(|f| f.len() == 5)
        .find(|f| {
            let matches = |field: &str, value: &str| field == "*" || field == value;
            matches(&f[0], host)
                && matches(&f[1], &port)
                && matches(&f[2], database)
                && matches(&f[3], user)
        })
        .map(|f| f[4].clone())
}

/// A line split on unescaped colons, escapes removed. The password is the rest of the
/// line, colons included, as in libpq.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("one field at least").push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().expect("one field at least").push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_line_gives_the_password_with_wildcards_and_escapes() {
        let text = "# main\n\
                    main.example:5432:odoo:walsync:s3cret\n\
                    *:*:*:walsync:fallback\\:with:colons\n";
        assert_eq!(
            find(text, "main.example", 5432, "odoo", "walsync").as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            find(text, "branch1", 5433, "odoo", "walsync").as_deref(),
            Some("fallback:with:colons")
        );
        assert_eq!(find(text, "branch1", 5433, "odoo", "odoo"), None);
    }

    #[test]
    fn a_file_others_can_read_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("walsync-pgpass-{}", std::process::id()));
        std::fs::write(&path, "*:*:*:*:pw\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(lookup(&path, "h", 5432, "d", "u"), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(lookup(&path, "h", 5432, "d", "u").as_deref(), Some("pw"));
        let _ = std::fs::remove_file(path);
    }
}
