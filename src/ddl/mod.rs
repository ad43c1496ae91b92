//! DDL replay, the pure part: from a captured `walsync.ddl_log` row to the one statement
//! the target must run.
//!
//! The capture (`migrations/0004_ddl_capture.sql`) logs the whole client string and the
//! position of the DDL statement among the string's DDL statements. Here the string is
//! split with PostgreSQL's own parser (pg_query), statements that fire no event trigger
//! (DML, SET, transaction control, ...) are left out — their effects travel in the WAL or
//! are session-local — and the statement at that position is returned. `CREATE TABLE AS`
//! and `SELECT INTO` come back as `CREATE TABLE AS ... WITH NO DATA`: their rows travel
//! in the WAL too.
//!
//! No I/O: pg_query parses in-process.

use pg_query::protobuf::{self, node::Node as N, CreateTableAsStmt, ObjectType};
use pg_query::NodeEnum;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DdlError {
    #[error("the captured statement does not parse: {0}")]
    Parse(String),
    #[error(
        "the captured DDL ran inside a DO block or a function, so its text is not in the client string; \
         apply it by hand on this node, then skip it (walsync ddl-replay --skip ORIGIN/SEQ)"
    )]
    NotText,
}

/// Whether PostgreSQL runs `ddl_command_end` event triggers for this statement
/// (PostgreSQL docs, "Event Trigger Firing Matrix").
fn fires_event_trigger(node: &NodeEnum) -> bool {
    !matches!(
        node,
        NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_)
            | NodeEnum::CopyStmt(_)
            | NodeEnum::TransactionStmt(_)
            | NodeEnum::VariableSetStmt(_)
            | NodeEnum::VariableShowStmt(_)
            | NodeEnum::ExplainStmt(_)
            | NodeEnum::CallStmt(_)
            | NodeEnum::DoStmt(_)
            | NodeEnum::LockStmt(_)
            | NodeEnum::VacuumStmt(_)
            | NodeEnum::ClusterStmt(_)
            | NodeEnum::ListenStmt(_)
            | NodeEnum::NotifyStmt(_)
            | NodeEnum::UnlistenStmt(_)
            | NodeEnum::PrepareStmt(_)
            | NodeEnum::ExecuteStmt(_)
            | NodeEnum::DeallocateStmt(_)
            | NodeEnum::DiscardStmt(_)
            | NodeEnum::CheckPointStmt(_)
            | NodeEnum::TruncateStmt(_)
            | NodeEnum::CreatedbStmt(_)
            | NodeEnum::DropdbStmt(_)
            | NodeEnum::AlterDatabaseStmt(_)
            | NodeEnum::AlterDatabaseSetStmt(_)
            | NodeEnum::CreateRoleStmt(_)
            | NodeEnum::AlterRoleStmt(_)
            | NodeEnum::AlterRoleSetStmt(_)
            | NodeEnum::DropRoleStmt(_)
            | NodeEnum::CreateTableSpaceStmt(_)
            | NodeEnum::DropTableSpaceStmt(_)
            | NodeEnum::AlterTableSpaceOptionsStmt(_)
            | NodeEnum::ReindexStmt(_)
            | NodeEnum::LoadStmt(_)
            | NodeEnum::FetchStmt(_)
            | NodeEnum::DeclareCursorStmt(_)
            | NodeEnum::ClosePortalStmt(_)
            | NodeEnum::ConstraintsSetStmt(_)
            | NodeEnum::CreateEventTrigStmt(_)
            | NodeEnum::AlterEventTrigStmt(_)
    ) && !matches!(node, NodeEnum::SelectStmt(s) if s.into_clause.is_none())
}

/// The statement to run on a target for the `index`-th (1-based) DDL statement of `query`.
pub fn statement_to_replay(query: &str, index: i32) -> Result<String, DdlError> {
    let pieces = pg_query::split_with_parser(query).map_err(|e| DdlError::Parse(e.to_string()))?;
    let mut ddl = Vec::new();
    for piece in pieces {
        let parsed = pg_query::parse(piece, pg_query::ParserOptions::DEFAULT)
            .map_err(|e| DdlError::Parse(e.to_string()))?;
        let Some(node) = parsed
            .protobuf
            .stmts
            .first()
            .and_then(|s| s.stmt.as_ref())
            .and_then(|n| n.node.clone())
        else {
            continue;
        };
        // DDL run by a DO block is not in the client's text.
        if matches!(node, NodeEnum::DoStmt(_)) {
            return Err(DdlError::NotText);
        }
        if fires_event_trigger(&node) {
            ddl.push((piece, node, parsed.protobuf.version));
        }
    }
    if ddl.is_empty() {
        return Err(DdlError::NotText);
    }
    // A string run twice in one transaction counts on: wrap around.
    let k = (index.max(1) - 1) as usize % ddl.len();
    let (piece, node, version) = &ddl[k];
    Ok(structure_only(node, *version).unwrap_or_else(|| piece.trim().to_string()))
}

/// Columns an `ALTER TABLE ... ADD COLUMN` fills with values each node computes on its
/// own: a default that calls a function (`now()`, `random()`, `nextval(...)`) or a serial
/// type. PostgreSQL writes those values while rewriting the table, without WAL rows for
/// logical decoding, so existing rows end with different values on each node.
pub fn columns_filled_per_node(statement: &str) -> Vec<String> {
    let Ok(parsed) = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT) else {
        return Vec::new();
    };
    let mut columns = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(NodeEnum::AlterTableStmt(alter)) = raw.stmt.as_ref().and_then(|n| n.node.as_ref())
        else {
            continue;
        };
        for cmd in &alter.cmds {
            let Some(NodeEnum::AlterTableCmd(cmd)) = cmd.node.as_ref() else {
                continue;
            };
            if cmd.subtype != protobuf::AlterTableType::AtAddColumn as i32 {
                continue;
            }
            let Some(NodeEnum::ColumnDef(col)) = cmd.def.as_ref().and_then(|d| d.node.as_ref())
            else {
                continue;
            };
            let serial = col.type_name.as_ref().is_some_and(|t| {
                t.names.iter().any(|n| {
                    matches!(&n.node, Some(NodeEnum::String(s)) if matches!(s.sval.as_str(), "serial" | "bigserial" | "smallserial" | "serial4" | "serial8" | "serial2"))
                })
            });
            let computed_default = col.constraints.iter().any(|c| {
                matches!(&c.node, Some(NodeEnum::Constraint(k))
                if k.contype == protobuf::ConstrType::ConstrDefault as i32
                    && k.raw_expr.as_ref().is_some_and(|e| {
                        let tree = format!("{e:?}");
                        tree.contains("FuncCall") || tree.contains("SqlvalueFunction")
                    }))
            });
            if serial || computed_default {
                columns.push(col.colname.clone());
            }
        }
    }
    columns
}

/// `statement` with the literal after every `password` masked, for logs and messages:
/// `CREATE USER MAPPING ... OPTIONS (password 'x')` replicates like any DDL, but its
/// secret never appears in clear outside the statement that runs.
pub fn redact_secrets(statement: &str) -> String {
    let lower = statement.to_ascii_lowercase();
    let mut out = String::with_capacity(statement.len());
    let mut from = 0;
    while let Some(found) = lower[from..].find("password") {
        let after = from + found + "password".len();
        let rest = &statement[after..];
        let skipped = rest.len() - rest.trim_start_matches([' ', '\t', '\n', '=']).len();
        let literal_at = after + skipped;
        if statement[literal_at..].starts_with('\'') {
            // The literal ends at a quote not doubled ('' is a quote inside it).
            let bytes = statement.as_bytes();
            let mut i = literal_at + 1;
            while i < bytes.len() {
                if bytes[i] == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            out.push_str(&statement[from..literal_at]);
            out.push_str("'***'");
            from = (i + 1).min(statement.len());
        } else {
            out.push_str(&statement[from..after]);
            from = after;
        }
    }
    out.push_str(&statement[from..]);
    out
}

/// The table an `ALTER TABLE` statement changes: (schema if written, name).
pub fn altered_table(statement: &str) -> Option<(Option<String>, String)> {
    let parsed = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT).ok()?;
    let raw = parsed.protobuf.stmts.first()?;
    let Some(NodeEnum::AlterTableStmt(alter)) = raw.stmt.as_ref().and_then(|n| n.node.as_ref())
    else {
        return None;
    };
    let rel = alter.relation.as_ref()?;
    let schema = (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone());
    Some((schema, rel.relname.clone()))
}

/// The column names an SQL expression over one table reads (`lower(name::text)` reads
/// `name`), in order of appearance; empty if it does not parse.
pub fn columns_read(expression: &str) -> Vec<String> {
    let Ok(parsed) = pg_query::parse(
        &format!("SELECT {expression}"),
        pg_query::ParserOptions::DEFAULT,
    ) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for (node, ..) in parsed.protobuf.nodes() {
        if let pg_query::NodeRef::ColumnRef(c) = node {
            if let Some(Some(NodeEnum::String(s))) = c.fields.last().map(|f| f.node.as_ref()) {
                if !names.contains(&s.sval) {
                    names.push(s.sval.clone());
                }
            }
        }
    }
    names
}

/// `CREATE TABLE AS` / `SELECT INTO` rewritten to create the table without its rows.
fn structure_only(node: &NodeEnum, version: i32) -> Option<String> {
    let ctas = match node {
        NodeEnum::CreateTableAsStmt(s) => {
            let mut s = (**s).clone();
            if let Some(into) = s.into.as_mut() {
                into.skip_data = true;
            }
            s
        }
        NodeEnum::SelectStmt(sel) if sel.into_clause.is_some() => {
            let mut sel = (**sel).clone();
            let mut into = sel.into_clause.take().expect("checked above");
            into.skip_data = true;
            CreateTableAsStmt {
                query: Some(Box::new(protobuf::Node {
                    node: Some(N::SelectStmt(Box::new(sel))),
                })),
                into: Some(into),
                objtype: ObjectType::ObjectTable as i32,
                is_select_into: false,
                if_not_exists: false,
            }
        }
        _ => return None,
    };
    let tree = protobuf::ParseResult {
        version,
        stmts: vec![protobuf::RawStmt {
            stmt: Some(Box::new(protobuf::Node {
                node: Some(N::CreateTableAsStmt(Box::new(ctas))),
            })),
            stmt_location: 0,
            stmt_len: 0,
        }],
    };
    pg_query::deparse(&tree, Default::default()).ok()
}

/// What a node does with a captured statement that arrives in the stream
/// (`walsync.ddl_log`), decided from the row and the link alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DdlVerdict {
    /// Run it here, then keep its row.
    Run,
    /// Keep its row without running it: this node is the author of the statement an
    /// accepting row accepts (it ran here when it was made).
    RanHereAlready,
    /// Keep its row, run nothing, and record why: its author is not one whose schema
    /// changes run here (`ddl_from`); a person may accept it.
    Refused,
    /// Neither run nor keep it, and record it: the row claims an author other than the
    /// node whose transaction carries it. A node writes only its own DDL rows.
    Forged,
}

/// The [`DdlVerdict`] for a `walsync.ddl_log` row claiming `row_origin`, carried by a
/// transaction written by `author`, arriving at node `here` that runs DDL from
/// `ddl_from` (`None`: every node). `accepts` is the accepted statement's origin if the
/// row accepts one.
pub fn verdict(
    row_origin: &str,
    author: &str,
    here: &str,
    ddl_from: Option<&[String]>,
    accepts: Option<&str>,
) -> DdlVerdict {
    if row_origin != author {
        return DdlVerdict::Forged;
    }
    if ddl_from.is_some_and(|nodes| !nodes.iter().any(|n| n == row_origin)) {
        return DdlVerdict::Refused;
    }
    if accepts == Some(here) {
        return DdlVerdict::RanHereAlready;
    }
    DdlVerdict::Run
}

/// A rename a captured statement made: of a column (`column` is `Some((old, new))`) or
/// of the table itself (`column` is `None`, `new_table` the new name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    /// The table as the statement named it (schema if written, name).
    pub table: (Option<String>, String),
    pub column: Option<(String, String)>,
    pub new_table: Option<String>,
}

/// The rename `statement` makes, if it is an `ALTER TABLE ... RENAME [COLUMN] ... TO`.
pub fn rename(statement: &str) -> Option<Rename> {
    let parsed = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT).ok()?;
    let Some(N::RenameStmt(r)) = parsed.protobuf.stmts.first()?.stmt.as_ref()?.node.as_ref() else {
        return None;
    };
    let rel = r.relation.as_ref()?;
    let table = (
        (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone()),
        rel.relname.clone(),
    );
    if r.rename_type == ObjectType::ObjectColumn as i32 {
        Some(Rename {
            table,
            column: Some((r.subname.clone(), r.newname.clone())),
            new_table: None,
        })
    } else if r.rename_type == ObjectType::ObjectTable as i32 {
        Some(Rename {
            table,
            column: None,
            new_table: Some(r.newname.clone()),
        })
    } else {
        None
    }
}

/// What column `column` of table `table` (in `schema`) is called after `renames` (in
/// the order they ran), following a table renamed on the way; `None` if it was never
/// renamed. A rename that names no schema is taken for the table of that name.
pub fn renamed_column(
    renames: &[Rename],
    schema: &str,
    table: &str,
    column: &str,
) -> Option<String> {
    let mut table = table.to_string();
    let mut column = column.to_string();
    let mut renamed = false;
    for r in renames {
        let same_table = r.table.1 == table && r.table.0.as_deref().is_none_or(|s| s == schema);
        if !same_table {
            continue;
        }
        match (&r.column, &r.new_table) {
            (Some((old, new)), _) if *old == column => {
                column = new.clone();
                renamed = true;
            }
            (None, Some(new_table)) => table = new_table.clone(),
            _ => {}
        }
    }
    renamed.then_some(column)
}

/// What table `schema.table` is called after `renames`; `None` if it was never renamed.
pub fn renamed_table(renames: &[Rename], schema: &str, table: &str) -> Option<String> {
    let mut name = table.to_string();
    for r in renames {
        if r.table.1 == name && r.table.0.as_deref().is_none_or(|s| s == schema) {
            if let Some(new) = &r.new_table {
                name = new.clone();
            }
        }
    }
    (name != table).then_some(name)
}

/// The name a probe gives the table it creates or copies ([`Probe`]).
pub const PROBE_TABLE: &str = "walsync_probe_tbl";
/// The name a probe gives the index, column or constraint it creates.
pub const PROBE_OBJECT: &str = "walsync_probe_obj";

/// A creating statement that failed because what it creates exists here (two stores
/// installed one module during a cut), and the same statement made to create it under
/// other names, on a table of its own: run beside the existing object and compared with
/// it (`apply::ddl`), it tells whether the statement's effect is here already. The probe
/// never touches the existing table: a `CREATE TABLE` creates [`PROBE_TABLE`]; an
/// index, column or constraint is added, as [`PROBE_OBJECT`], to an empty copy of its
/// table named [`PROBE_TABLE`] (so a NOT NULL column or a constraint is not checked
/// against rows, and no index is built over them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The existing table: the one created, or the one the index, column or constraint
    /// belongs to (schema if written, name).
    pub table: (Option<String>, String),
    /// The index, column or constraint name; `None` for a `CREATE TABLE`.
    pub object: Option<String>,
    /// The statement on the probe's names.
    pub statement: String,
}

impl Probe {
    /// Whether the probe needs an empty copy of [`Probe::table`] named [`PROBE_TABLE`]
    /// first (everything but a `CREATE TABLE`).
    pub fn needs_copy(&self) -> bool {
        self.object.is_some()
    }

    /// The probe's names and the statement's, to read the probe's shape as the
    /// statement's.
    pub fn renames(&self) -> Vec<(&str, &str)> {
        let mut r = vec![(PROBE_TABLE, self.table.1.as_str())];
        if let Some(o) = &self.object {
            r.push((PROBE_OBJECT, o.as_str()));
        }
        r
    }
}

/// The [`Probe`] of `statement`: a `CREATE TABLE`, a named `CREATE INDEX`, or an
/// `ALTER TABLE` with one `ADD COLUMN` or one named `ADD CONSTRAINT`.
pub fn probe(statement: &str) -> Option<Probe> {
    let mut parsed = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT).ok()?;
    if parsed.protobuf.stmts.len() != 1 {
        return None;
    }
    let node = parsed.protobuf.stmts[0].stmt.as_mut()?.node.as_mut()?;
    // The relation renamed to the probe's table, in the schema written (if any).
    let to_probe_table = |rel: &mut protobuf::RangeVar| {
        let schema = (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone());
        let name = std::mem::replace(&mut rel.relname, PROBE_TABLE.to_string());
        (schema, name)
    };
    let (table, object) = match node {
        N::CreateStmt(create) if create.inh_relations.is_empty() && create.partbound.is_none() => {
            (to_probe_table(create.relation.as_mut()?), None)
        }
        N::IndexStmt(index) if !index.idxname.is_empty() && !index.concurrent => {
            let table = to_probe_table(index.relation.as_mut()?);
            let name = std::mem::replace(&mut index.idxname, PROBE_OBJECT.to_string());
            (table, Some(name))
        }
        N::AlterTableStmt(alter) if alter.cmds.len() == 1 => {
            let table = to_probe_table(alter.relation.as_mut()?);
            let Some(N::AlterTableCmd(cmd)) = alter.cmds[0].node.as_mut() else {
                return None;
            };
            let add_column = cmd.subtype == protobuf::AlterTableType::AtAddColumn as i32;
            let add_constraint = cmd.subtype == protobuf::AlterTableType::AtAddConstraint as i32;
            let name = match cmd.def.as_mut()?.node.as_mut()? {
                N::ColumnDef(col) if add_column => {
                    std::mem::replace(&mut col.colname, PROBE_OBJECT.to_string())
                }
                N::Constraint(con) if add_constraint && !con.conname.is_empty() => {
                    std::mem::replace(&mut con.conname, PROBE_OBJECT.to_string())
                }
                _ => return None,
            };
            (table, Some(name))
        }
        _ => return None,
    };
    let statement = pg_query::deparse(&parsed.protobuf, Default::default()).ok()?;
    Some(Probe {
        table,
        object,
        statement,
    })
}

/// The sequence a `CREATE SEQUENCE` makes (schema if written, name); `None` for other
/// statements. A sequence's position is each node's own (and walsync partitions it), so
/// one of that name here is the statement's effect.
pub fn created_sequence(statement: &str) -> Option<(Option<String>, String)> {
    let parsed = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT).ok()?;
    if parsed.protobuf.stmts.len() != 1 {
        return None;
    }
    match parsed.protobuf.stmts[0].stmt.as_ref()?.node.as_ref()? {
        N::CreateSeqStmt(s) => {
            let rel = s.sequence.as_ref()?;
            let schema = (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone());
            Some((schema, rel.relname.clone()))
        }
        _ => None,
    }
}

/// The table a DDL statement creates or changes (`schema.table`, `public` where it
/// names no schema), for what waits behind it; `None` for other statements.
pub fn statement_table(statement: &str) -> Option<String> {
    let parsed = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT).ok()?;
    let rel = match parsed
        .protobuf
        .stmts
        .first()?
        .stmt
        .as_ref()?
        .node
        .as_ref()?
    {
        N::CreateStmt(s) => s.relation.as_ref()?,
        N::AlterTableStmt(s) => s.relation.as_ref()?,
        N::IndexStmt(s) => s.relation.as_ref()?,
        N::RenameStmt(s) => s.relation.as_ref()?,
        N::CreateTableAsStmt(s) => s.into.as_ref()?.rel.as_ref()?,
        _ => return None,
    };
    let schema = if rel.schemaname.is_empty() {
        "public"
    } else {
        &rel.schemaname
    };
    Some(format!("{schema}.{}", rel.relname))
}

/// A unique index or constraint a statement makes over plain columns, with no predicate:
/// what a target's rows may violate, and what settling them there needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueIndex {
    /// The table as the statement named it (schema if written, name).
    pub table: (Option<String>, String),
    /// Its name as written ("" if the statement names none).
    pub name: String,
    pub columns: Vec<String>,
}

/// The [`UniqueIndex`] of `statement`: a `CREATE UNIQUE INDEX` on columns (no expression,
/// no `WHERE`), or an `ALTER TABLE ... ADD [CONSTRAINT name] UNIQUE (columns)`.
pub fn unique_index(statement: &str) -> Option<UniqueIndex> {
    let parsed = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT).ok()?;
    if parsed.protobuf.stmts.len() != 1 {
        return None;
    }
    let table_of = |rel: &protobuf::RangeVar| {
        (
            (!rel.schemaname.is_empty()).then(|| rel.schemaname.clone()),
            rel.relname.clone(),
        )
    };
    match parsed.protobuf.stmts[0].stmt.as_ref()?.node.as_ref()? {
        N::IndexStmt(index) if index.unique && index.where_clause.is_none() => {
            let columns = index
                .index_params
                .iter()
                .map(|p| match p.node.as_ref()? {
                    N::IndexElem(e) if e.expr.is_none() && !e.name.is_empty() => {
                        Some(e.name.clone())
                    }
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            Some(UniqueIndex {
                table: table_of(index.relation.as_ref()?),
                name: index.idxname.clone(),
                columns,
            })
        }
        N::AlterTableStmt(alter) if alter.cmds.len() == 1 => {
            let Some(N::AlterTableCmd(cmd)) = alter.cmds[0].node.as_ref() else {
                return None;
            };
            if cmd.subtype != protobuf::AlterTableType::AtAddConstraint as i32 {
                return None;
            }
            let Some(N::Constraint(con)) = cmd.def.as_ref()?.node.as_ref() else {
                return None;
            };
            if con.contype != protobuf::ConstrType::ConstrUnique as i32 || con.keys.is_empty() {
                return None;
            }
            let columns = con
                .keys
                .iter()
                .map(|k| match k.node.as_ref()? {
                    N::String(s) => Some(s.sval.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            Some(UniqueIndex {
                table: table_of(alter.relation.as_ref()?),
                name: con.conname.clone(),
                columns,
            })
        }
        _ => None,
    }
}

/// Whether the effect of a creating statement is here already: every item of the shape
/// its probe gave (`probed`: columns, constraints and indexes as text), with the probe's
/// names read as the statement's (`renames`), is one of the existing table's
/// (`existing`). The existing table may hold more (later statements of the same install
/// ran here first), also on a column: a `NOT NULL` or a default a later statement gave it
/// (`column NAME TYPE[ not null][ default EXPR]`, as `apply::ddl` reads them).
///
/// A name PostgreSQL generated for the probe (`walsync_probe_tbl_pkey`, an unnamed
/// index's `walsync_probe_tbl_a_b_idx`) stands for whatever name it generated for the
/// existing table: that one may be cut short to 63 bytes, or carry a digit where the
/// name was taken, and neither can be known from the probe's.
pub fn already_here(probed: &[String], existing: &[String], renames: &[(&str, &str)]) -> bool {
    probed.iter().all(|item| {
        let pieces: Vec<String> = split_generated_names(item)
            .into_iter()
            .map(|piece| {
                renames
                    .iter()
                    .fold(piece, |text, (probe, name)| text.replace(probe, name))
            })
            .collect();
        existing.iter().any(|e| matches_with_any_names(&pieces, e))
            || (pieces.len() == 1 && existing.iter().any(|e| column_has_at_least(e, &pieces[0])))
    })
}

/// `item` cut around each name generated from [`PROBE_TABLE`] (`walsync_probe_tbl_`
/// and identifier characters after it): the pieces between them.
fn split_generated_names(item: &str) -> Vec<String> {
    let generated = format!("{PROBE_TABLE}_");
    let mut pieces = Vec::new();
    let mut rest = item;
    while let Some(at) = rest.find(&generated) {
        pieces.push(rest[..at].to_string());
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    pieces.push(rest.to_string());
    pieces
}

/// Whether `text` is `pieces` with one name (an identifier, quoted or not) between each
/// two.
fn matches_with_any_names(pieces: &[String], text: &str) -> bool {
    let Some((first, more)) = pieces.split_first() else {
        return text.is_empty();
    };
    let Some(rest) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    if more.is_empty() {
        return rest.is_empty();
    }
    let name_end = if let Some(quoted) = rest.strip_prefix('"') {
        match quoted.find('"') {
            Some(close) => close + 2,
            None => return false,
        }
    } else {
        rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(rest.len())
    };
    name_end > 0 && matches_with_any_names(more, &rest[name_end..])
}

/// Whether column item `existing` is column item `probed` with at most a `not null` and
/// a default added (the ones `probed` has, it has too).
fn column_has_at_least(existing: &str, probed: &str) -> bool {
    let parts = |item: &str| {
        let (head, default) = match item.split_once(" default ") {
            Some((h, d)) => (h.to_string(), Some(d.to_string())),
            None => (item.to_string(), None),
        };
        match head.strip_suffix(" not null") {
            Some(h) => (h.to_string(), true, default),
            None => (head, false, default),
        }
    };
    if !existing.starts_with("column ") || !probed.starts_with("column ") {
        return false;
    }
    let (e_head, e_not_null, e_default) = parts(existing);
    let (p_head, p_not_null, p_default) = parts(probed);
    e_head == p_head
        && (e_not_null || !p_not_null)
        && (p_default.is_none() || p_default == e_default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_found_here_may_have_gained_a_not_null_or_default_from_a_later_statement() {
        let existing = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let here = existing(&["column company_id integer not null default 1"]);
        for (probed, found) in [
            ("column company_id integer", true),
            ("column company_id integer not null", true),
            ("column company_id integer default 1", true),
            ("column company_id integer default 2", false),
            ("column company_id bigint", false),
            ("column company integer", false),
        ] {
            assert_eq!(
                already_here(&[probed.to_string()], &here, &[]),
                found,
                "{probed}"
            );
        }
        let plain = existing(&["column company_id integer"]);
        assert!(!already_here(
            &["column company_id integer not null".into()],
            &plain,
            &[]
        ));
    }

    #[test]
    fn a_name_generated_for_the_probe_matches_the_one_generated_here_cut_short_or_numbered() {
        let table = "product_attribute_value_product_template_attribute_line_rel";
        let renames = [(PROBE_TABLE, table)];
        let probed = [
            format!("constraint {PROBE_TABLE}_pkey PRIMARY KEY (a, b)"),
            format!(
                "CREATE UNIQUE INDEX {PROBE_TABLE}_pkey ON public.{PROBE_TABLE} USING btree (a, b)"
            ),
            format!(
                "CREATE INDEX {PROBE_TABLE}_b_a_idx ON public.{PROBE_TABLE} USING btree (b, a)"
            ),
            "column a integer not null".to_string(),
            format!("column c integer not null default nextval('{PROBE_TABLE}_c_seq'::regclass)"),
        ];
        let here = |pkey: &str, idx: &str| {
            vec![
                "column a integer not null".to_string(),
                "column b integer not null".to_string(),
                format!("column c integer not null default nextval('{table}_c_seq'::regclass)"),
                format!("constraint {pkey} PRIMARY KEY (a, b)"),
                format!("CREATE UNIQUE INDEX {pkey} ON public.{table} USING btree (a, b)"),
                format!("CREATE INDEX {idx} ON public.{table} USING btree (b, a)"),
            ]
        };
        let cut = here(
            "product_attribute_value_product_template_attribute_line_re_pkey",
            "product_attribute_value_produ_b_a_idx1",
        );
        assert!(already_here(&probed, &cut, &renames));
        // The same names with another definition, or a definition on another table: no.
        let other = here("x_pkey", "x_idx")
            .into_iter()
            .map(|i| i.replace("(b, a)", "(a, b)"))
            .collect::<Vec<_>>();
        assert!(!already_here(&probed, &other, &renames));
        let elsewhere = cut
            .iter()
            .map(|i| i.replace(&format!("public.{table}"), "public.other"))
            .collect::<Vec<_>>();
        assert!(!already_here(&probed, &elsewhere, &renames));
        // A name the statement wrote must be the same.
        let named = [format!("constraint {PROBE_OBJECT} CHECK ((a > 0))")];
        let check = |name: &str| vec![format!("constraint {name} CHECK ((a > 0))")];
        assert!(already_here(
            &named,
            &check("a_positive"),
            &[(PROBE_OBJECT, "a_positive")]
        ));
        assert!(!already_here(
            &named,
            &check("other"),
            &[(PROBE_OBJECT, "a_positive")]
        ));
    }

    #[test]
    fn the_sequence_a_create_sequence_makes_is_read() {
        assert_eq!(
            created_sequence("CREATE SEQUENCE ir_sequence_001 INCREMENT BY 1 START WITH 1"),
            Some((None, "ir_sequence_001".to_string()))
        );
        assert_eq!(
            created_sequence("CREATE SEQUENCE shop.s"),
            Some((Some("shop".to_string()), "s".to_string()))
        );
        assert_eq!(created_sequence("CREATE TABLE s (id int)"), None);
    }

    #[test]
    fn the_table_a_statement_changes_is_read_with_public_as_its_default_schema() {
        for (statement, table) in [
            ("CREATE TABLE coupon (id int)", Some("public.coupon")),
            (
                "ALTER TABLE shop.partner ADD COLUMN vat text",
                Some("shop.partner"),
            ),
            ("CREATE INDEX ON partner (email)", Some("public.partner")),
            (
                "ALTER TABLE partner RENAME COLUMN a TO b",
                Some("public.partner"),
            ),
            ("CREATE TABLE copy AS SELECT 1", Some("public.copy")),
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                None,
            ),
        ] {
            assert_eq!(statement_table(statement).as_deref(), table, "{statement}");
        }
    }

    #[test]
    fn a_unique_index_or_constraint_on_columns_is_read_and_others_are_not() {
        let idx =
            unique_index("CREATE UNIQUE INDEX partner_email ON shop.partner (email, company_id)")
                .unwrap();
        assert_eq!(idx.table, (Some("shop".into()), "partner".into()));
        assert_eq!(idx.name, "partner_email");
        assert_eq!(idx.columns, ["email", "company_id"]);
        let con = unique_index("ALTER TABLE partner ADD CONSTRAINT partner_login UNIQUE (login)")
            .unwrap();
        assert_eq!(con.table, (None, "partner".into()));
        assert_eq!(
            (con.name.as_str(), con.columns.as_slice()),
            ("partner_login", &["login".to_string()][..])
        );
        for other in [
            "CREATE INDEX partner_email ON partner (email)",
            "CREATE UNIQUE INDEX partner_email ON partner (lower(email))",
            "CREATE UNIQUE INDEX partner_email ON partner (email) WHERE active",
            "ALTER TABLE partner ADD CONSTRAINT p CHECK (id > 0)",
            "ALTER TABLE partner ADD CONSTRAINT partner_pkey PRIMARY KEY (id)",
            "CREATE TABLE x (id int UNIQUE)",
        ] {
            assert_eq!(unique_index(other), None, "{other}");
        }
    }

    const ODOO_M2M: &str = "CREATE TABLE IF NOT EXISTS \"pos_config_product_category_rel\" (\"pos_config_id\" INTEGER NOT NULL REFERENCES \"pos_config\"(id) ON DELETE cascade, \"product_category_id\" INTEGER NOT NULL REFERENCES \"product_category\"(id) ON DELETE cascade, PRIMARY KEY(\"pos_config_id\",\"product_category_id\"));\n                    COMMENT ON TABLE \"pos_config_product_category_rel\" IS 'RELATION BETWEEN pos_config AND product_category';\n                    CREATE INDEX ON \"pos_config_product_category_rel\" (\"product_category_id\", \"pos_config_id\");";

    #[test]
    fn a_creating_statement_is_probed_under_other_names() {
        let p = probe("CREATE TABLE gift_card (id serial PRIMARY KEY, code text)").unwrap();
        assert_eq!(p.table, (None, "gift_card".to_string()));
        assert!(!p.needs_copy());
        assert!(
            p.statement
                .starts_with("CREATE TABLE walsync_probe_tbl (id serial"),
            "{}",
            p.statement
        );

        let p =
            probe("CREATE UNIQUE INDEX gift_card_code ON public.gift_card (lower(code))").unwrap();
        assert_eq!(
            p.table,
            (Some("public".to_string()), "gift_card".to_string())
        );
        assert!(p.needs_copy());
        assert_eq!(
            p.renames(),
            vec![
                ("walsync_probe_tbl", "gift_card"),
                ("walsync_probe_obj", "gift_card_code")
            ]
        );
        assert!(
            p.statement
                .starts_with("CREATE UNIQUE INDEX walsync_probe_obj ON public.walsync_probe_tbl"),
            "{}",
            p.statement
        );

        let p = probe("ALTER TABLE \"gift_card\" ADD COLUMN \"amount\" numeric NOT NULL DEFAULT 0")
            .unwrap();
        assert_eq!(p.object.as_deref(), Some("amount"));
        assert!(
            p.statement.contains(
                "walsync_probe_tbl ADD COLUMN walsync_probe_obj numeric NOT NULL DEFAULT 0"
            ),
            "{}",
            p.statement
        );

        let p = probe("ALTER TABLE gift_card ADD CONSTRAINT gift_card_code_uniq UNIQUE (code)")
            .unwrap();
        assert_eq!(p.object.as_deref(), Some("gift_card_code_uniq"));
        assert!(
            p.statement.contains("CONSTRAINT walsync_probe_obj UNIQUE"),
            "{}",
            p.statement
        );

        for other in [
            "ALTER TABLE gift_card ADD COLUMN a int, ADD COLUMN b int",
            "CREATE INDEX ON gift_card (code)",
            "DROP TABLE gift_card",
            "CREATE TABLE a (id int); CREATE TABLE b (id int)",
            "CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1)",
        ] {
            assert_eq!(probe(other), None, "{other}");
        }
    }

    #[test]
    fn ddl_runs_only_from_its_author_and_from_nodes_whose_ddl_is_accepted() {
        let hub = ["main".to_string()];
        assert_eq!(
            verdict("main", "main", "branch1", Some(&hub), None),
            DdlVerdict::Run
        );
        assert_eq!(
            verdict("branch1", "branch1", "main", Some(&hub), None),
            DdlVerdict::Refused
        );
        assert_eq!(
            verdict("branch1", "branch1", "main", None, None),
            DdlVerdict::Run,
            "a mesh"
        );
        assert_eq!(
            verdict("main", "branch1", "branch2", Some(&hub), None),
            DdlVerdict::Forged,
            "a store's row claiming main"
        );
        assert_eq!(
            verdict("main", "branch1", "main", None, None),
            DdlVerdict::Forged
        );
        assert_eq!(
            verdict("main", "main", "branch1", Some(&hub), Some("branch1")),
            DdlVerdict::RanHereAlready,
            "main accepted branch1's statement: branch1 made it"
        );
        assert_eq!(
            verdict("main", "main", "branch2", Some(&hub), Some("branch1")),
            DdlVerdict::Run
        );
    }

    #[test]
    fn renames_are_followed_in_the_order_they_ran() {
        let renames: Vec<Rename> = [
            "ALTER TABLE pos_order RENAME COLUMN amount_total TO amount",
            "ALTER TABLE public.pos_order RENAME amount TO amount_paid",
            "ALTER TABLE other RENAME COLUMN note TO memo",
            "ALTER TABLE pos_order RENAME TO pos_sale",
            "ALTER TABLE pos_sale RENAME COLUMN note TO comment",
        ]
        .iter()
        .map(|s| rename(s).unwrap())
        .collect();
        assert_eq!(
            renamed_column(&renames, "public", "pos_order", "amount_total").as_deref(),
            Some("amount_paid")
        );
        assert_eq!(
            renamed_column(&renames, "public", "pos_order", "note").as_deref(),
            Some("comment"),
            "followed through the table's own rename"
        );
        assert_eq!(
            renamed_column(&renames, "public", "pos_order", "name"),
            None
        );
        assert_eq!(
            renamed_column(&renames, "shop", "pos_order", "amount_total").as_deref(),
            Some("amount"),
            "unqualified renames: any schema; the qualified one is public's"
        );
        assert_eq!(
            renamed_table(&renames, "public", "pos_order").as_deref(),
            Some("pos_sale")
        );
        assert_eq!(renamed_table(&renames, "public", "partner"), None);
        assert_eq!(rename("ALTER TABLE a ADD COLUMN b int"), None);
        assert_eq!(rename("ALTER INDEX a RENAME TO b"), None);
    }

    #[test]
    fn a_statement_is_here_already_when_every_item_of_its_probe_is() {
        let existing = vec![
            "column id integer not null default nextval('gift_card_id_seq'::regclass)".to_string(),
            "column code text".to_string(),
            "column amount numeric".to_string(),
            "constraint gift_card_pkey PRIMARY KEY (id)".to_string(),
        ];
        let probed = vec![
            "column id integer not null default nextval('walsync_probe_tbl_id_seq'::regclass)"
                .to_string(),
            "column code text".to_string(),
            "constraint walsync_probe_tbl_pkey PRIMARY KEY (id)".to_string(),
        ];
        let renames = [("walsync_probe_tbl", "gift_card")];
        assert!(already_here(&probed, &existing, &renames));
        let other = vec!["column code varchar(20)".to_string()];
        assert!(!already_here(&other, &existing, &renames));
    }

    #[test]
    fn each_ddl_statement_of_a_multi_statement_string_is_found_by_position() {
        assert!(statement_to_replay(ODOO_M2M, 1)
            .unwrap()
            .starts_with("CREATE TABLE IF NOT EXISTS"));
        assert!(statement_to_replay(ODOO_M2M, 2)
            .unwrap()
            .starts_with("COMMENT ON TABLE"));
        assert!(statement_to_replay(ODOO_M2M, 3)
            .unwrap()
            .starts_with("CREATE INDEX ON"));
        assert!(
            statement_to_replay(ODOO_M2M, 4)
                .unwrap()
                .starts_with("CREATE TABLE"),
            "a second run of the same string"
        );
    }

    #[test]
    fn dml_in_the_string_is_not_counted_and_never_replayed() {
        let q = "CREATE TABLE t (id serial PRIMARY KEY); INSERT INTO t DEFAULT VALUES; \
                 SELECT setval('t_id_seq', 10); ALTER TABLE t ADD COLUMN n int; UPDATE t SET n = 1";
        assert_eq!(
            statement_to_replay(q, 1).unwrap(),
            "CREATE TABLE t (id serial PRIMARY KEY)"
        );
        assert_eq!(
            statement_to_replay(q, 2).unwrap(),
            "ALTER TABLE t ADD COLUMN n int"
        );
    }

    #[test]
    fn create_table_as_and_select_into_replay_the_structure_only() {
        let s = statement_to_replay(
            "CREATE TABLE archive AS SELECT * FROM pos_order WHERE id < 10",
            1,
        )
        .unwrap();
        assert!(s.contains("WITH NO DATA"), "{s}");
        let s = statement_to_replay("SELECT id, name INTO archive2 FROM pos_order", 1).unwrap();
        assert!(
            s.starts_with("CREATE TABLE archive2 AS SELECT") && s.contains("WITH NO DATA"),
            "{s}"
        );
    }

    #[test]
    fn columns_added_with_values_computed_per_node_are_named() {
        assert_eq!(
            columns_filled_per_node("ALTER TABLE t ADD COLUMN seen timestamptz DEFAULT now()"),
            ["seen"]
        );
        assert_eq!(
            columns_filled_per_node("ALTER TABLE t ADD COLUMN n serial"),
            ["n"]
        );
        assert_eq!(
            columns_filled_per_node(
                "ALTER TABLE t ADD COLUMN at timestamp DEFAULT CURRENT_TIMESTAMP"
            ),
            ["at"]
        );
        assert!(
            columns_filled_per_node("ALTER TABLE t ADD COLUMN state varchar DEFAULT 'draft'")
                .is_empty()
        );
        assert!(columns_filled_per_node("ALTER TABLE t ADD COLUMN n int").is_empty());
        assert!(
            columns_filled_per_node("CREATE TABLE t (at timestamp DEFAULT now())").is_empty(),
            "a new table has no rows"
        );
    }

    #[test]
    fn passwords_in_captured_ddl_are_masked_for_logs() {
        assert_eq!(
            redact_secrets("CREATE USER MAPPING FOR odoo SERVER hq OPTIONS (user 'u', password 'it''s secret')"),
            "CREATE USER MAPPING FOR odoo SERVER hq OPTIONS (user 'u', password '***')"
        );
        assert_eq!(
            redact_secrets("ALTER USER MAPPING FOR odoo SERVER hq OPTIONS (SET PASSWORD 'x')"),
            "ALTER USER MAPPING FOR odoo SERVER hq OPTIONS (SET PASSWORD '***')"
        );
        assert_eq!(
            redact_secrets("CREATE TABLE password_policy (id int)"),
            "CREATE TABLE password_policy (id int)"
        );
    }

    #[test]
    fn the_table_an_alter_changes_is_named() {
        assert_eq!(
            altered_table("ALTER TABLE public.orders ADD COLUMN at timestamptz DEFAULT now()"),
            Some((Some("public".into()), "orders".into()))
        );
        assert_eq!(
            altered_table("ALTER TABLE \"Orders\" ADD COLUMN n serial"),
            Some((None, "Orders".into()))
        );
        assert_eq!(altered_table("CREATE TABLE t (id int)"), None);
    }

    #[test]
    fn the_columns_an_index_expression_reads_are_found() {
        assert_eq!(columns_read("lower((name)::text)"), ["name"]);
        assert_eq!(
            columns_read("COALESCE(user_id, '-1'::integer)"),
            ["user_id"]
        );
        assert_eq!(
            columns_read("(\"Weird Col\" || lower(t.code))"),
            ["Weird Col", "code"]
        );
        assert!(columns_read("((").is_empty());
    }

    #[test]
    fn ddl_inside_a_do_block_is_refused_with_a_clear_error() {
        let err = statement_to_replay("DO $$ BEGIN EXECUTE 'CREATE TABLE x (id int)'; END $$", 1)
            .unwrap_err();
        assert_eq!(err, DdlError::NotText);
        assert!(err.to_string().contains("by hand"));
        assert!(matches!(
            statement_to_replay("CREATE TABLE (", 1),
            Err(DdlError::Parse(_))
        ));
    }
}
