//! `walsync conflicts`: the conflicts this node decided, and a way to bring a losing
//! version back.
//!
//! `walsync conflicts --config F [list] [--table T] [--kind K] [--since TIME] [--json]`
//! `walsync conflicts --config F show ID`
//! `walsync conflicts --config F reapply ID` writes the losing version again as a new
//! local write: it then wins everywhere (it is the latest) and replicates like any edit.

use std::process::ExitCode;

use serde_json::{json, Value as Json};

use super::{CliResult, ConfigArg};
use crate::merge::conflict::{ConflictKind, Outcome};
use crate::names::quote_ident;
use crate::node::connect::connect;

#[derive(Debug, clap::Args)]
pub struct ConflictsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(subcommand)]
    pub action: Option<ConflictsAction>,
    /// Only conflicts on this table (`name` or `schema.name`).
    #[arg(long, global = true)]
    pub table: Option<String>,
    /// Only this kind (insert_exists, update_exists, multiple_unique_conflicts, update_origin_differs,
    /// update_missing, update_deleted, delete_origin_differs, delete_missing, delete_referenced, table_dropped,
    /// column_dropped, forged_record, out_of_scope).
    #[arg(long, global = true)]
    pub kind: Option<String>,
    /// Only this outcome (remote_applied, local_kept, skipped, columns_merged, local_renamed,
    /// remote_renamed, parked).
    #[arg(long, global = true)]
    pub outcome: Option<String>,
    /// Only conflicts detected at or after this time (e.g. "2026-11-25 14:00+00").
    #[arg(long, global = true)]
    pub since: Option<String>,
    /// Print JSON (one array) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConflictsAction {
    /// List conflicts (the default).
    List,
    /// Show one conflict with both row images.
    Show { id: i64 },
    /// Write the losing version of a conflict again, as a new local write.
    Reapply { id: i64 },
    /// Mark a parked row as settled by hand, writing nothing (status stops showing it).
    Resolve { id: i64 },
    /// List the source transactions set aside until their table (or column) is here;
    /// they apply by themselves, in order, once it is.
    SetAside,
}

const COLUMNS: &str = "id, detected_at::text, link, kind, table_schema, table_name, key::text, \
    local_row::text, local_origin, local_commit_time::text, remote_row::text, remote_origin, \
    remote_commit_time::text, rule, outcome, reapplied_at::text, detail";

fn row_json(r: &tokio_postgres::Row) -> Json {
    let parse = |i: usize| -> Json {
        r.get::<_, Option<String>>(i)
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Json::Null)
    };
    json!({
        "id": r.get::<_, i64>(0),
        "detected_at": r.get::<_, String>(1),
        "link": r.get::<_, String>(2),
        "kind": r.get::<_, String>(3),
        "table": format!("{}.{}", r.get::<_, String>(4), r.get::<_, String>(5)),
        "key": parse(6),
        "local_row": parse(7),
        "local_origin": r.get::<_, Option<String>>(8),
        "local_commit_time": r.get::<_, Option<String>>(9),
        "remote_row": parse(10),
        "remote_origin": r.get::<_, String>(11),
        "remote_commit_time": r.get::<_, String>(12),
        "rule": r.get::<_, String>(13),
        "outcome": r.get::<_, String>(14),
        "reapplied_at": r.get::<_, Option<String>>(15),
        "detail": r.get::<_, Option<String>>(16),
    })
}

pub async fn run(args: ConflictsArgs) -> CliResult {
    let config = args.config.load()?;
    if let Some(kind) = &args.kind {
        if ConflictKind::parse(kind).is_none() {
            let kinds: Vec<&str> = ConflictKind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(format!("--kind {kind}: no such kind; one of {}", kinds.join(", ")).into());
        }
    }
    if let Some(outcome) = &args.outcome {
        if Outcome::parse(outcome).is_none() {
            let all: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
            return Err(format!(
                "--outcome {outcome}: no such outcome; one of {}",
                all.join(", ")
            )
            .into());
        }
    }
    let me = config.this_node();
    let mut client = connect(&me.dsn, "walsync conflicts").await?;
    match args.action.unwrap_or(ConflictsAction::List) {
        ConflictsAction::List => {
            let (schema, table) = match args.table.as_deref().map(|t| t.split_once('.')) {
                Some(Some((s, t))) => (Some(s.to_string()), Some(t.to_string())),
                Some(None) => (None, args.table.clone()),
                None => (None, None),
            };
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM walsync.conflicts \
                         WHERE ($1::text IS NULL OR table_schema = $1) AND ($2::text IS NULL OR table_name = $2) \
                           AND ($3::text IS NULL OR kind = $3) AND ($4::text IS NULL OR detected_at >= $4::timestamptz) \
                           AND ($5::text IS NULL OR outcome = $5) \
                         ORDER BY id"
                    ),
                    &[&schema, &table, &args.kind, &args.since, &args.outcome],
                )
                .await?;
            if args.json {
                let all: Vec<Json> = rows.iter().map(row_json).collect();
                super::print_out(&serde_json::to_string_pretty(&all)?);
                return Ok(ExitCode::SUCCESS);
            }
            let set_aside = set_aside_rows(&client).await?.len();
            let footer = (set_aside > 0).then(|| {
                format!(
                    "{set_aside} transaction(s) set aside, waiting for their table: walsync conflicts set-aside"
                )
            });
            if rows.is_empty() {
                println!("no conflicts on node {}", me.name);
                footer.iter().for_each(|f| println!("{f}"));
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = vec![[
                "id", "detected", "kind", "table", "outcome", "winner", "key",
            ]
            .map(String::from)];
            for r in &rows {
                table.push(list_line(&row_json(r)));
            }
            for line in aligned(&table) {
                super::print_out(&line);
            }
            footer.iter().for_each(|f| super::print_out(f));
            Ok(ExitCode::SUCCESS)
        }
        ConflictsAction::SetAside => {
            let all = set_aside_rows(&client).await?;
            if args.json {
                super::print_out(&serde_json::to_string_pretty(&all)?);
                return Ok(ExitCode::SUCCESS);
            }
            if all.is_empty() {
                println!("no transactions set aside on node {}", me.name);
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = vec![[
                "link",
                "end lsn",
                "author",
                "committed",
                "changes",
                "waits for",
                "tables",
            ]
            .map(String::from)];
            for j in &all {
                let text = |k: &str| j[k].as_str().unwrap_or("").to_string();
                table.push([
                    text("link"),
                    text("end_lsn"),
                    text("author"),
                    text("commit_time"),
                    j["changes"].to_string(),
                    text("waits_for"),
                    text("tables"),
                ]);
            }
            for line in aligned(&table) {
                super::print_out(&line);
            }
            Ok(ExitCode::SUCCESS)
        }
        ConflictsAction::Show { id } => {
            let row = client
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM walsync.conflicts WHERE id = $1"),
                    &[&id],
                )
                .await?
                .ok_or_else(|| format!("no conflict {id} on node {}", me.name))?;
            let j = row_json(&row);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                super::print_out(&show_text(&j));
            }
            Ok(ExitCode::SUCCESS)
        }
        ConflictsAction::Resolve { id } => {
            let n = client
                .execute(
                    "UPDATE walsync.conflicts SET reapplied_at = now() \
                     WHERE id = $1 AND outcome = 'parked' AND reapplied_at IS NULL",
                    &[&id],
                )
                .await?;
            if n == 0 {
                return Err(format!("conflict {id} on node {} is not a parked row waiting to be settled (see `walsync conflicts show {id}`)", me.name).into());
            }
            println!("conflict {id}: marked settled; nothing was written");
            Ok(ExitCode::SUCCESS)
        }
        ConflictsAction::Reapply { id } => reapply(&mut client, id).await,
    }
}

/// The source transactions set aside on this node (`walsync.set_aside`), oldest first.
async fn set_aside_rows(
    client: &tokio_postgres::Client,
) -> Result<Vec<Json>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT link, end_lsn::text, origin, commit_time::text, set_aside_at::text, changes, \
                    waits_for, array_to_string(tables, ', ') \
             FROM walsync.set_aside ORDER BY link, end_lsn",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let origin: String = r.get(2);
            json!({
                "link": r.get::<_, String>(0),
                "end_lsn": r.get::<_, String>(1),
                "author": origin.strip_prefix("walsync_").unwrap_or(&origin),
                "commit_time": r.get::<_, String>(3),
                "set_aside_at": r.get::<_, String>(4),
                "changes": r.get::<_, i32>(5),
                "waits_for": r.get::<_, String>(6),
                "tables": r.get::<_, String>(7),
            })
        })
        .collect())
}

/// One conflict as a line of the list: the outcome says when the losing version was
/// written again (`reapply`) or a parked row settled by hand (`resolve`).
fn list_line(j: &Json) -> [String; 7] {
    let text = |v: &Json| v.as_str().unwrap_or("").to_string();
    let outcome = j["outcome"].as_str().and_then(Outcome::parse);
    let winner = match outcome.and_then(Outcome::remote_won) {
        Some(true) => text(&j["remote_origin"]),
        Some(false) => text(&j["local_origin"]),
        None => "-".to_string(),
    };
    let mut outcome_text = text(&j["outcome"]);
    if j["reapplied_at"].is_string() {
        outcome_text.push_str(if outcome == Some(Outcome::Parked) {
            ", settled"
        } else {
            ", reapplied"
        });
    }
    [
        j["id"].to_string(),
        text(&j["detected_at"]),
        text(&j["kind"]),
        text(&j["table"]),
        outcome_text,
        winner.trim_start_matches("walsync_").to_string(),
        j["key"].to_string(),
    ]
}

/// Lines of cells padded to each column's widest cell (the id column right-aligned, the
/// last one left as it is).
fn aligned<const N: usize>(rows: &[[String; N]]) -> Vec<String> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                match i {
                    0 => line.push_str(&format!("{}{cell}", " ".repeat(pad))),
                    _ if i + 1 == N => line.push_str(cell),
                    _ => line.push_str(&format!("{cell}{}", " ".repeat(pad))),
                }
                if i + 1 < N {
                    line.push_str("  ");
                }
            }
            line
        })
        .collect()
}

/// One conflict for a person: what happened, then each side's row, one column a line.
fn show_text(j: &Json) -> String {
    let text = |v: &Json| v.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "conflict {} on {}, detected {} on link {}\n  kind     {}\n  key      {}\n  rule     {}\n  outcome  {}\n",
        j["id"],
        text(&j["table"]),
        text(&j["detected_at"]),
        text(&j["link"]),
        text(&j["kind"]),
        j["key"],
        text(&j["rule"]),
        text(&j["outcome"]),
    );
    if let Some(at) = j["reapplied_at"].as_str() {
        out.push_str(&format!("  reapplied or settled at {at}\n"));
    }
    if let Some(d) = j["detail"].as_str() {
        out.push_str(&format!("  detail   {d}\n"));
    }
    for (side, row, origin, time) in [
        (
            "this node's row",
            "local_row",
            "local_origin",
            "local_commit_time",
        ),
        (
            "the incoming row",
            "remote_row",
            "remote_origin",
            "remote_commit_time",
        ),
    ] {
        out.push_str(&format!(
            "\n{side} (written by {}, committed {}):\n",
            text(&j[origin]).trim_start_matches("walsync_"),
            text(&j[time])
        ));
        match j[row].as_object() {
            Some(columns) => {
                let width = columns.keys().map(|k| k.chars().count()).max().unwrap_or(0);
                for (column, value) in columns {
                    out.push_str(&format!("  {column:<width$}  {value}\n"));
                }
            }
            None => out.push_str("  (none)\n"),
        }
    }
    out.push_str("\n(--json for the same as JSON)");
    out
}

/// Writes the losing image of conflict `id` as a new local write (insert, update or the
/// losing delete) and marks the conflict reapplied, in one transaction.
async fn reapply(client: &mut tokio_postgres::Client, id: i64) -> CliResult {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM walsync.conflicts WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or_else(|| format!("no conflict {id} on this node"))?;
    let j = row_json(&row);
    if let Some(at) = j["reapplied_at"].as_str() {
        return Err(format!(
            "conflict {id} was reapplied (or resolved) at {at} already; writing it again could undo a later edit. \
             See `walsync conflicts show {id}` and change the row by hand if needed"
        )
        .into());
    }
    let outcome = j["outcome"].as_str().and_then(Outcome::parse);
    match outcome {
        Some(Outcome::LocalRenamed | Outcome::RemoteRenamed) => {
            return Err(format!(
                "conflict {id} lost nothing: both rows are kept, the loser renamed ({}); \
                 merge or rename them by hand if they are the same thing",
                j["detail"].as_str().unwrap_or("")
            )
            .into())
        }
        Some(Outcome::Merged) => {
            return Err(format!(
                "conflict {id} is a merge of one entity created on two nodes ({}). It cannot be undone by \
                 writing a row back: the rows that pointed at the merged-away row point at the one that stayed \
                 on every node, and walsync.merged_keys sends later ones there too. The merged-away row is \
                 kept in `walsync conflicts show {id}`; copy what you need from it into the row that stayed",
                j["detail"].as_str().unwrap_or("")
            )
            .into())
        }
        Some(Outcome::ColumnsMerged) => {
            return Err(format!(
                "conflict {id} is a column merge: each column kept the row-level winner's edit; \
                 see both images with `walsync conflicts show {id}` and UPDATE the columns you want by hand"
            )
            .into())
        }
        _ => {}
    }
    let schema: String = row.get(4);
    let table: String = row.get(5);
    let key = j["key"].as_object().cloned().unwrap_or_default();
    let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
    let (kind, detail) = (
        j["kind"].as_str().unwrap_or(""),
        j["detail"].as_str().unwrap_or(""),
    );
    // A change outside its author's write scope (`out_of_scope`): its detail starts with
    // what it was (`apply::scope`).
    let out_of_scope = kind == ConflictKind::OutOfScope.as_str();
    if out_of_scope && detail.starts_with("TRUNCATE") {
        return Err(format!(
            "conflict {id} is a TRUNCATE that was not applied ({detail}); run it by hand if it is wanted"
        )
        .into());
    }
    if kind == ConflictKind::DeleteReferenced.as_str() {
        return Err(format!(
            "conflict {id} is a delete of a row that rows here still refer to ({detail}); deleting it would leave \
             them pointing at nothing, so it is not reapplied: delete or re-point the referring rows first, \
             then delete the row with SQL (it replicates)"
        )
        .into());
    }
    let losing_delete = (kind.starts_with("delete_") && outcome == Some(Outcome::LocalKept))
        || (out_of_scope && detail.starts_with("DELETE "));
    let (sql, params, what) = if losing_delete {
        let cond: Vec<String> = key
            .keys()
            .enumerate()
            .map(|(i, c)| format!("{}::text = ${}", quote_ident(c), i + 1))
            .collect();
        let values: Vec<String> = key
            .values()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        (
            format!("DELETE FROM {qualified} WHERE {}", cond.join(" AND ")),
            values,
            "delete",
        )
    } else {
        let loser = match outcome {
            Some(Outcome::RemoteApplied) => &j["local_row"],
            _ => &j["remote_row"],
        };
        let Some(image) = loser.as_object() else {
            return Err(format!(
                "conflict {id} has no losing row image to write (kind {})",
                j["kind"]
            )
            .into());
        };
        let columns: Vec<&String> = image.keys().collect();
        let set: Vec<String> = columns
            .iter()
            .filter(|c| !key.contains_key(c.as_str()))
            .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
            .collect();
        let col_list = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let key_list = key
            .keys()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        // jsonb_populate_record reads each text value with the column type's input function.
        let sql = format!(
            "INSERT INTO {qualified} ({col_list}) SELECT {col_list} \
             FROM jsonb_populate_record(NULL::{qualified}, $1::text::jsonb) ON CONFLICT ({key_list}) DO {}",
            if set.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", set.join(", ")) }
        );
        (
            sql,
            vec![Json::Object(image.clone()).to_string()],
            "version",
        )
    };
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let txn = client.transaction().await?;
    txn.execute(&sql, &params).await?;
    txn.execute(
        "UPDATE walsync.conflicts SET reapplied_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    txn.commit().await?;
    println!(
        "conflict {id}: the losing {what} of {schema}.{table} {} is written again; it replicates as a new edit",
        j["key"]
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict(id: i64, outcome: &str, reapplied: bool) -> Json {
        json!({
            "id": id, "detected_at": "2026-12-07 21:02:52.123456+00", "link": "main->branch1",
            "kind": "update_origin_differs", "table": "public.partner", "key": {"id": 17},
            "local_row": {"id": 17, "name": "alice"}, "local_origin": "walsync_branch1",
            "local_commit_time": "2026-12-07 21:02:50+00",
            "remote_row": {"id": 17, "name": "alice b"}, "remote_origin": "walsync_main",
            "remote_commit_time": "2026-12-07 21:02:51+00", "rule": "last_writer_wins",
            "outcome": outcome, "reapplied_at": if reapplied { json!("2026-12-07 22:00:00+00") } else { Json::Null },
            "detail": null,
        })
    }

    #[test]
    fn the_list_keeps_its_columns_aligned_and_marks_what_was_written_again() {
        let mut table = vec![[
            "id", "detected", "kind", "table", "outcome", "winner", "key",
        ]
        .map(String::from)];
        table.push(list_line(&conflict(7, "remote_applied", false)));
        table.push(list_line(&conflict(12345, "local_kept", true)));
        table.push(list_line(&conflict(8, "parked", true)));
        let lines = aligned(&table);
        let kind_at: Vec<usize> = lines
            .iter()
            .map(|l| {
                l.find("update_origin_differs")
                    .or_else(|| l.find("kind"))
                    .unwrap()
            })
            .collect();
        assert!(kind_at.windows(2).all(|w| w[0] == w[1]), "{lines:#?}");
        assert!(lines[1].starts_with("    7  "), "{lines:#?}");
        assert!(lines[2].contains("local_kept, reapplied") && lines[2].contains("branch1"));
        assert!(lines[3].contains("parked, settled"));
        assert!(lines[1].contains("remote_applied ") && !lines[1].contains("reapplied"));
    }

    #[test]
    fn show_prints_both_rows_column_by_column() {
        let text = show_text(&conflict(7, "remote_applied", false));
        assert!(text.starts_with("conflict 7 on public.partner"), "{text}");
        assert!(
            text.contains("this node's row (written by branch1"),
            "{text}"
        );
        assert!(text.contains("the incoming row (written by main"), "{text}");
        assert!(text.contains("  name  \"alice b\""), "{text}");
    }
}
