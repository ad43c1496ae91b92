//! Where the PostgreSQL programs are: `walsync join` runs pg_dump and pg_restore from
//! there, and the test kit's local clusters initdb, pg_ctl and postgres.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The bin directory of the PostgreSQL installation to use: `pg_config --bindir` if it
/// has every one of `programs`, else the newest `/usr/lib/postgresql/<version>/bin` that
/// has them, else the directory of an `initdb` or `pg_dump` found on `PATH`. The error
/// says everywhere it looked.
pub fn bindir(programs: &[&str]) -> Result<PathBuf, String> {
    let mut tried = Vec::new();

    match Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            match missing(&dir, programs) {
                None => return Ok(dir),
                Some(missing) => tried.push(format!(
                    "pg_config --bindir says {}, which lacks {missing}",
                    dir.display()
                )),
            }
        }
        Ok(out) => tried.push(format!(
            "pg_config --bindir failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => tried.push(format!("cannot run pg_config: {e}")),
    }

    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let key = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((key, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    match versions
        .iter()
        .rev()
        .find(|(_, dir)| missing(dir, programs).is_none())
    {
        Some((_, dir)) => return Ok(dir.clone()),
        None if versions.is_empty() => tried.push(format!("no versions in {}", root.display())),
        None => tried.push(format!("no complete bin directory in {}", root.display())),
    }

    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let Some(initdb) = programs.iter().map(|p| dir.join(p)).find(|p| p.is_file()) else {
                continue;
            };
            // Follow symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb)
            // so that the other programs are found next to the real initdb.
            let real = fs::canonicalize(&initdb).unwrap_or(initdb);
            if let Some(real_dir) = real.parent() {
                match missing(real_dir, programs) {
                    None => return Ok(real_dir.to_path_buf()),
                    Some(missing) => tried.push(format!("{} lacks {missing}", real_dir.display())),
                }
            }
        }
        tried.push(format!(
            "no complete bin directory with {} on PATH",
            programs.join(", ")
        ));
    }

    Err(tried.join("; "))
}

/// Which of `programs` `dir` lacks, as a list for messages; `None` if none.
fn missing(dir: &Path, programs: &[&str]) -> Option<String> {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|program| !dir.join(program).is_file())
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(missing.join(", "))
    }
}
