//! Row changes to statements: which SQL writes a decoded change on the target, and with
//! which parameters. Pure; the applier prepares each distinct [`Shape`] once per session.
//!
//! Rows are found on the target by its primary key (or replica identity index), taken
//! from the old tuple when the source sent one (the key may have changed) and from the
//! new tuple otherwise. Columns are matched by name, so column order may differ between
//! nodes. Unchanged TOAST values (`u`) are left out of an UPDATE's SET list: the target
//! keeps what it has (PostgreSQL docs, "Logical Replication Message Formats", TupleData).

use crate::names::quote_ident;
use crate::pgoutput::{OldTuple, Relation, Tuple, Value};

/// A table on the target as its catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetTable {
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
    /// Each column's type as SQL names it (schema-qualified outside `pg_catalog`), no
    /// modifier: a batch of rows names it for its values.
    pub types: Vec<String>,
    /// Indexes into `columns` of the primary key (or replica identity index).
    pub key: Vec<usize>,
    /// Its unique indexes other than the primary key: plain, partial, on expressions
    /// and deferrable ones.
    pub uniques: Vec<UniqueKey>,
}

/// A unique key other than the primary key: where two nodes' rows can collide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    /// The index's name, for errors and conflict records.
    pub name: String,
    /// Indexes into the table's `columns`.
    pub columns: Vec<usize>,
    /// The first text column of the key and its length limit in characters: where the
    /// losing row of a collision is renamed. `None`: no text column, no renaming.
    pub renamable: Option<(usize, Option<usize>)>,
    /// How to find the rows that collide when the key is not plain columns compared
    /// with `=`: `None` for a plain unique key, whose `columns` are the key.
    pub lookup: Option<IndexLookup>,
}

/// A unique index on expressions, with a predicate (partial) or checked at commit
/// (deferrable): its rows are found by evaluating the index's own definition on the
/// incoming row's values and on the table's rows. Then [`UniqueKey::columns`] are every
/// column the definition reads, in parameter order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexLookup {
    /// Each key column of the index as SQL over the table's column names
    /// (`pg_get_indexdef(index, k, true)`): a column name or an expression.
    pub keys: Vec<String>,
    /// The index's `WHERE` clause, if it is partial.
    pub predicate: Option<String>,
    /// The SQL type of each of [`UniqueKey::columns`] (`format_type`), to cast the
    /// incoming row's values to.
    pub types: Vec<String>,
}

impl TargetTable {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// How a source relation's columns land in a target table.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationMap {
    pub target: TargetTable,
    /// For each source column, its index in `target.columns`.
    source_to_target: Vec<usize>,
    /// For each target key column, its index in the source relation.
    key_in_source: Vec<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatementError {
    #[error("column {column:?} of {table} exists on the upstream but not here; the schemas differ (apply the missing DDL here, then the link resumes)")]
    MissingColumn { table: String, column: String },
    #[error("{table} has no key here and the upstream sent no old row to find the row by (its table needs REPLICA IDENTITY FULL there: walsync init sets it)")]
    NoOldImage { table: String },
    #[error("key column {column:?} of {table} is not sent by the upstream; give both tables the same primary key")]
    KeyNotSent { table: String, column: String },
    #[error("{table}: tuple has {got} values, relation has {want} columns")]
    TupleWidth {
        table: String,
        got: usize,
        want: usize,
    },
    #[error("{table}: the upstream sent no value for key column {column:?} (unchanged TOAST or missing old tuple)")]
    KeyValueMissing { table: String, column: String },
    #[error("{table}: an insert carried an unchanged-TOAST marker for column {column:?}")]
    ToastInInsert { table: String, column: String },
}

/// The statement a change needs; together with the relation it names one prepared statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `rows` rows of these target columns in one statement; parameters row by row.
    Insert {
        columns: Vec<usize>,
        rows: usize,
    },
    /// Target columns set, in parameter order; key parameters follow.
    Update {
        set: Vec<usize>,
    },
    /// Like `Update`, then each counter column moved by (new - old): parameters are the
    /// set values, then per counter its new and old value, then the key.
    UpdateCounters {
        set: Vec<usize>,
        counters: Vec<usize>,
    },
    Delete,
    /// `COPY ... FROM STDIN` of rows with these target columns (consecutive inserts).
    Copy {
        columns: Vec<usize>,
    },
    /// One row of these columns, doing nothing if a unique key already holds it.
    InsertOrNothing {
        columns: Vec<usize>,
    },
    /// The local row by key, locked: every column as text, then its last writer's origin
    /// name (NULL: written here) and commit time in µs since 2000-01-01 (NULL: unknown).
    ReadLocal,
    /// As `ReadLocal`, but the rows holding these values in these target columns (a
    /// unique key's), with parameters in that order.
    ReadByColumns {
        columns: Vec<usize>,
    },
    /// As `ReadLocal`, but the rows that collide on the target's `uniques[unique]`, an
    /// index with a [`IndexLookup`]; parameters are the incoming row's values of that
    /// key's `columns`, in that order.
    ReadByIndex {
        unique: usize,
    },
    /// `rows` updates or deletes (`write`, each a row's) that write only if the local
    /// rows would be decided `Apply` without a record ([`RelationMap::guarded`]), and
    /// fail with `division_by_zero` unless every row was written. Parameters: the
    /// changes' origin id here and, if `compared`, their commit time in µs since
    /// 2000-01-01 (one source transaction's, shared); then per row `write`'s parameters
    /// and the old image's values of the `compared` target columns.
    Guarded {
        write: Box<Shape>,
        /// Target columns compared with the change's old image; `None`: the change
        /// carries no old image that could match the local row.
        compared: Option<Vec<usize>>,
        rows: usize,
    },
    /// In a keyless table: one row whose `compared` target columns hold the old image
    /// (as the walsender printed it) gets `set`. Parameters: the set values, then the
    /// compared ones.
    UpdateByImage {
        set: Vec<usize>,
        compared: Vec<usize>,
    },
    /// In a keyless table: one row whose `compared` target columns hold the old image is
    /// deleted. Parameters: the compared values.
    DeleteByImage {
        compared: Vec<usize>,
    },
}

impl Shape {
    /// A [`Shape::Guarded`]'s parameters shared by its rows (they come first).
    pub fn shared_params(&self) -> usize {
        match self {
            Shape::Guarded { compared: None, .. } => 1,
            Shape::Guarded { .. } => 2,
            _ => 0,
        }
    }
}

/// A change ready to execute: the statement's shape and its parameters, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct RowWrite {
    pub shape: Shape,
    pub params: Vec<Value>,
}

impl RelationMap {
    /// A table without a primary key or replica identity index maps too (a keyless
    /// table, [`RelationMap::is_keyless`]): its rows are found by their whole old image.
    pub fn new(source: &Relation, target: TargetTable) -> Result<RelationMap, StatementError> {
        let table = target.qualified();
        let source_to_target = source
            .columns
            .iter()
            .map(|c| {
                target
                    .columns
                    .iter()
                    .position(|t| *t == c.name)
                    .ok_or_else(|| StatementError::MissingColumn {
                        table: table.clone(),
                        column: c.name.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key_in_source = target
            .key
            .iter()
            .map(|&k| {
                source_to_target
                    .iter()
                    .position(|&t| t == k)
                    .ok_or_else(|| StatementError::KeyNotSent {
                        table: table.clone(),
                        column: target.columns[k].clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RelationMap {
            target,
            source_to_target,
            key_in_source,
        })
    }

    fn check_width(&self, t: &Tuple) -> Result<(), StatementError> {
        if t.0.len() != self.source_to_target.len() {
            return Err(StatementError::TupleWidth {
                table: self.target.qualified(),
                got: t.0.len(),
                want: self.source_to_target.len(),
            });
        }
        Ok(())
    }

    pub fn insert(&self, new: &Tuple) -> Result<RowWrite, StatementError> {
        let mut params = Vec::with_capacity(new.0.len());
        self.insert_values(new, &mut params)?;
        Ok(RowWrite {
            shape: Shape::Insert {
                columns: self.insert_columns().to_vec(),
                rows: 1,
            },
            params,
        })
    }

    /// Whether the target has no primary key or replica identity index: its rows are
    /// found by their whole old image ([`RelationMap::update_by_image`]), one row per
    /// change, as PostgreSQL's own apply finds them under REPLICA IDENTITY FULL.
    pub fn is_keyless(&self) -> bool {
        self.target.key.is_empty()
    }

    /// An update of a keyless table: the first row equal to the old image `old` gets the
    /// new values. `None` when it writes nothing (every new value unchanged TOAST).
    pub fn update_by_image(
        &self,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<Option<RowWrite>, StatementError> {
        self.check_width(new)?;
        let old = self.old_image(old)?;
        let Some((set, mut params)) = self.set_values(new, new.0.len()) else {
            return Ok(None);
        };
        let compared = self.image_values(old, &mut params);
        Ok(Some(RowWrite {
            shape: Shape::UpdateByImage { set, compared },
            params,
        }))
    }

    /// A delete from a keyless table: the first row equal to the old image.
    pub fn delete_by_image(&self, old: &OldTuple) -> Result<RowWrite, StatementError> {
        let old = self.old_image(Some(old))?;
        let mut params = Vec::with_capacity(old.0.len());
        let compared = self.image_values(old, &mut params);
        Ok(RowWrite {
            shape: Shape::DeleteByImage { compared },
            params,
        })
    }

    /// The target columns an update sets (every one the new image carries, unchanged
    /// TOAST left out) and their values, with room for `more` parameters after them;
    /// `None` if it sets nothing.
    fn set_values(&self, new: &Tuple, more: usize) -> Option<(Vec<usize>, Vec<Value>)> {
        let mut set = Vec::with_capacity(new.0.len());
        let mut params = Vec::with_capacity(new.0.len() + more);
        for (i, v) in new.0.iter().enumerate() {
            if !matches!(v, Value::UnchangedToast) {
                set.push(self.source_to_target[i]);
                params.push(v.clone());
            }
        }
        (!set.is_empty()).then_some((set, params))
    }

    /// The whole old row a keyless table's change was made on.
    fn old_image<'a>(&self, old: Option<&'a OldTuple>) -> Result<&'a Tuple, StatementError> {
        match old {
            Some(OldTuple::Full(t)) => {
                self.check_width(t)?;
                Ok(t)
            }
            _ => Err(StatementError::NoOldImage {
                table: self.target.qualified(),
            }),
        }
    }

    /// Appends the old image's comparable values to `params`; returns their target
    /// columns. Unchanged TOAST and binary values are not compared (text is what the
    /// walsender printed, which the target's output functions print alike).
    fn image_values(&self, old: &Tuple, params: &mut Vec<Value>) -> Vec<usize> {
        let mut compared = Vec::with_capacity(old.0.len());
        for (i, v) in old.0.iter().enumerate() {
            if matches!(v, Value::UnchangedToast | Value::Binary(_)) {
                continue;
            }
            compared.push(self.source_to_target[i]);
            params.push(v.clone());
        }
        compared
    }

    /// For each target key column (key order), its index in the source relation: where an
    /// insert's values hold the row's key.
    pub fn key_in_source(&self) -> &[usize] {
        &self.key_in_source
    }

    /// The target columns an insert writes, in the order of its values: every column the
    /// upstream sends.
    pub fn insert_columns(&self) -> &[usize] {
        &self.source_to_target
    }

    /// Appends an insert's values to `out`, in the order of [`RelationMap::insert_columns`]
    /// (nothing is appended if the tuple cannot be inserted).
    pub fn insert_values(&self, new: &Tuple, out: &mut Vec<Value>) -> Result<(), StatementError> {
        self.check_width(new)?;
        if let Some(i) = new
            .0
            .iter()
            .position(|v| matches!(v, Value::UnchangedToast))
        {
            return Err(StatementError::ToastInInsert {
                table: self.target.qualified(),
                column: self.target.columns[self.source_to_target[i]].clone(),
            });
        }
        out.extend(new.0.iter().cloned());
        Ok(())
    }

    /// `None` when the update changes nothing that can be written (every column unchanged TOAST).
    pub fn update(
        &self,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<Option<RowWrite>, StatementError> {
        self.check_width(new)?;
        let Some((set, mut params)) = self.set_values(new, self.key_in_source.len()) else {
            return Ok(None);
        };
        params.extend(self.key_values(old, Some(new))?);
        Ok(Some(RowWrite {
            shape: Shape::Update { set },
            params,
        }))
    }

    /// `write` (an update or delete on the fast path) made to write only where the
    /// careful path would decide [`crate::merge::conflict::Decision::Apply`]: where the
    /// local row exists and either its last writer is the change's origin (`origin_id`,
    /// its `roident` here), or it holds exactly the change's old image `old` (its
    /// `unsent` source columns aside, as [`crate::merge::conflict::Against::made_on_local`]
    /// compares) and did not commit after the change (`commit_time_us`). Anything else
    /// must be decided and maybe recorded: the statement fails and its transaction is
    /// applied again carefully.
    pub fn guarded(
        &self,
        write: RowWrite,
        old: Option<&OldTuple>,
        unsent: &[usize],
        origin_id: u32,
        commit_time_us: i64,
    ) -> RowWrite {
        let old_len = match old {
            Some(OldTuple::Full(old)) => old.0.len(),
            _ => 0,
        };
        let mut params = Vec::with_capacity(2 + write.params.len() + old_len);
        params.push(Value::Text(origin_id.to_string().into()));
        let compared = match old {
            Some(OldTuple::Full(old)) if !old.0.iter().any(|v| matches!(v, Value::Binary(_))) => {
                params.push(Value::Text(commit_time_us.to_string().into()));
                params.extend(write.params);
                let mut columns = Vec::with_capacity(old_len);
                for (i, v) in old.0.iter().enumerate() {
                    if matches!(v, Value::UnchangedToast) || unsent.contains(&i) {
                        continue;
                    }
                    columns.push(self.source_to_target[i]);
                    params.push(v.clone());
                }
                Some(columns)
            }
            _ => {
                params.extend(write.params);
                None
            }
        };
        RowWrite {
            shape: Shape::Guarded {
                write: Box::new(write.shape),
                compared,
                rows: 1,
            },
            params,
        }
    }

    /// An update of a table with counter columns (`counters`: source column indexes),
    /// made on the old image `old`: each counter moves by (new - old) whatever its local
    /// value, so concurrent changes add up; the other columns are set from `new` when
    /// `set_others` (the caller's decision: the update changed them and won). `None` if
    /// nothing is left to write.
    pub fn update_counters(
        &self,
        old: &Tuple,
        new: &Tuple,
        counters: &[usize],
        set_others: bool,
    ) -> Result<Option<RowWrite>, StatementError> {
        self.check_width(new)?;
        self.check_width(old)?;
        let mut set = Vec::new();
        let mut params = Vec::new();
        if set_others {
            for (i, v) in new.0.iter().enumerate() {
                if !counters.contains(&i) && !matches!(v, Value::UnchangedToast) {
                    set.push(self.source_to_target[i]);
                    params.push(v.clone());
                }
            }
        }
        let mut moved = Vec::new();
        for &i in counters {
            if let (Value::Text(n), Value::Text(o)) = (&new.0[i], &old.0[i]) {
                if n != o {
                    moved.push(self.source_to_target[i]);
                    params.push(new.0[i].clone());
                    params.push(old.0[i].clone());
                }
            }
        }
        if set.is_empty() && moved.is_empty() {
            return Ok(None);
        }
        params.extend(self.key_values(Some(&OldTuple::Full(old.clone())), Some(new))?);
        Ok(Some(RowWrite {
            shape: Shape::UpdateCounters {
                set,
                counters: moved,
            },
            params,
        }))
    }

    /// Source column indexes of these target column names (for counter policies).
    /// The source column that lands in target column `t`, if the source sends it.
    pub fn source_index_of_target(&self, t: usize) -> Option<usize> {
        self.source_to_target.iter().position(|&x| x == t)
    }

    pub fn source_indexes_of(&self, names: &[String]) -> Vec<usize> {
        (0..self.source_to_target.len())
            .filter(|&i| names.contains(&self.target.columns[self.source_to_target[i]]))
            .collect()
    }

    pub fn delete(&self, old: &OldTuple) -> Result<RowWrite, StatementError> {
        let params = self.key_values(Some(old), None)?;
        Ok(RowWrite {
            shape: Shape::Delete,
            params,
        })
    }

    /// The key that finds the row: the old tuple's value where sent, else the new tuple's.
    pub fn key_values(
        &self,
        old: Option<&OldTuple>,
        new: Option<&Tuple>,
    ) -> Result<Vec<Value>, StatementError> {
        let old = old.map(|o| match o {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        });
        if let Some(o) = old {
            self.check_width(o)?;
        }
        self.key_in_source
            .iter()
            .map(|&s| {
                let from_old = old
                    .map(|o| &o.0[s])
                    .filter(|v| matches!(v, Value::Text(_) | Value::Binary(_)));
                let from_new = new
                    .map(|n| &n.0[s])
                    .filter(|v| matches!(v, Value::Text(_) | Value::Binary(_)));
                from_old
                    .or(from_new)
                    .cloned()
                    .ok_or_else(|| StatementError::KeyValueMissing {
                        table: self.target.qualified(),
                        column: self.target.columns[self.target.key
                            [self.key_in_source.iter().position(|&x| x == s).unwrap_or(0)]]
                        .clone(),
                    })
            })
            .collect()
    }

    /// The write that replaces the whole local row with `new` (an insert that won
    /// `insert_exists`): every column set, the row found by the new tuple's key.
    pub fn overwrite(&self, new: &Tuple) -> Result<Option<RowWrite>, StatementError> {
        self.update(None, new)
    }

    /// Target column names in source column order (for row images).
    pub fn source_column_names(&self) -> Vec<String> {
        self.source_to_target
            .iter()
            .map(|&t| self.target.columns[t].clone())
            .collect()
    }

    /// Target key column names, in key order.
    pub fn key_names(&self) -> Vec<String> {
        self.target
            .key
            .iter()
            .map(|&k| self.target.columns[k].clone())
            .collect()
    }

    /// For each source column, its index in the target's columns (`ReadLocal` order).
    pub fn target_index_of_source(&self, source_column: usize) -> usize {
        self.source_to_target[source_column]
    }

    /// SQL text of a shape on this table; parameters are `$1..$n` in [`RowWrite::params`] order.
    pub fn sql(&self, shape: &Shape) -> String {
        let t = &self.target;
        let col = |i: usize| quote_ident(&t.columns[i]);
        let key_clause = |first: usize| {
            t.key
                .iter()
                .enumerate()
                .map(|(n, &k)| format!("{} = ${}", col(k), first + n))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let set_clause = |set: &[usize]| {
            set.iter()
                .enumerate()
                .map(|(n, &c)| format!("{} = ${}", col(c), n + 1))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match shape {
            Shape::Insert { columns, rows } => self.insert_sql(columns, *rows, 0),
            Shape::Update { set } => format!(
                "UPDATE {} SET {} WHERE {}",
                t.qualified(),
                set_clause(set),
                key_clause(set.len() + 1)
            ),
            Shape::Guarded {
                write,
                compared,
                rows,
            } => format!(
                "WITH {} SELECT 1 / (count(*) = {rows})::int FROM w",
                self.guarded_ctes(write, compared.as_deref(), *rows, 0, "")
            ),
            Shape::UpdateCounters { set, counters } => {
                let plain = set
                    .iter()
                    .enumerate()
                    .map(|(n, &c)| format!("{} = ${}", col(c), n + 1));
                // text -> numeric keeps every integer and decimal exact; the sum is cast
                // back to the column's type on assignment.
                let moved = counters.iter().enumerate().map(|(n, &c)| {
                    let p = set.len() + 2 * n + 1;
                    format!(
                        "{0} = {0} + (${1}::text::numeric - ${2}::text::numeric)",
                        col(c),
                        p,
                        p + 1
                    )
                });
                format!(
                    "UPDATE {} SET {} WHERE {}",
                    t.qualified(),
                    plain.chain(moved).collect::<Vec<_>>().join(", "),
                    key_clause(set.len() + 2 * counters.len() + 1)
                )
            }
            Shape::Delete => format!("DELETE FROM {} WHERE {}", t.qualified(), key_clause(1)),
            Shape::UpdateByImage { set, compared } => format!(
                "UPDATE {} SET {} WHERE (tableoid, ctid) = ({})",
                t.qualified(),
                set_clause(set),
                one_row_by_image(t, compared, set.len())
            ),
            Shape::DeleteByImage { compared } => format!(
                "DELETE FROM {} WHERE (tableoid, ctid) = ({})",
                t.qualified(),
                one_row_by_image(t, compared, 0)
            ),
            Shape::InsertOrNothing { columns } => format!(
                "{} ON CONFLICT DO NOTHING",
                self.sql(&Shape::Insert {
                    columns: columns.clone(),
                    rows: 1
                })
            ),
            Shape::ReadLocal => read_locked(t, &columns_equal(t, &t.key)),
            Shape::ReadByColumns { columns } => read_locked(t, &columns_equal(t, columns)),
            Shape::ReadByIndex { unique } => {
                read_locked(t, &index_collides(t, &t.uniques[*unique]))
            }
            Shape::Copy { columns } => format!(
                "COPY {} ({}) FROM STDIN",
                t.qualified(),
                columns
                    .iter()
                    .map(|&c| col(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// `rows` rows of `columns` inserted, their values in parameters `$first+1..`.
    fn insert_sql(&self, columns: &[usize], rows: usize, first: usize) -> String {
        let t = &self.target;
        format!(
            "INSERT INTO {} ({}) VALUES {}",
            t.qualified(),
            columns
                .iter()
                .map(|&c| quote_ident(&t.columns[c]))
                .collect::<Vec<_>>()
                .join(", "),
            (0..rows)
                .map(|r| {
                    let row =
                        (1..=columns.len()).map(|n| format!("${}", first + r * columns.len() + n));
                    format!("({})", row.collect::<Vec<_>>().join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// The two common table expressions of a [`Shape::Guarded`] write, `v{suffix}` (its
    /// rows) and `w{suffix}` (the write, returning a row per row written), with its
    /// parameters in `$first+1..`.
    fn guarded_ctes(
        &self,
        write: &Shape,
        compared: Option<&[usize]>,
        rows: usize,
        first: usize,
        suffix: &str,
    ) -> String {
        let t = &self.target;
        let col = |i: usize| quote_ident(&t.columns[i]);
        let v = format!("v{suffix}");
        // The rows as a VALUES list `v`: per row the values set (s1..), the key (k1..)
        // and the old image's compared values (o1..), each typed as its column (the
        // compared ones as text, as the walsender printed them).
        let set: &[usize] = match write {
            Shape::Update { set } => set,
            _ => &[],
        };
        let mut names = Vec::new();
        let mut types = Vec::new();
        for (n, &c) in set.iter().enumerate() {
            names.push(format!("s{}", n + 1));
            types.push(t.types[c].as_str());
        }
        for (n, &c) in t.key.iter().enumerate() {
            names.push(format!("k{}", n + 1));
            types.push(t.types[c].as_str());
        }
        for n in 0..compared.map_or(0, <[usize]>::len) {
            names.push(format!("o{}", n + 1));
            types.push("text");
        }
        let shared = if compared.is_some() { 2 } else { 1 };
        let values = (0..rows)
            .map(|r| {
                let row = types
                    .iter()
                    .enumerate()
                    .map(|(n, ty)| format!("${}::{ty}", first + shared + r * types.len() + n + 1));
                format!("({})", row.collect::<Vec<_>>().join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let key_matches = t
            .key
            .iter()
            .enumerate()
            .map(|(n, &k)| format!("t.{} = {v}.k{}", col(k), n + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let same_image = match compared {
            None => "false".to_string(),
            Some(columns) => std::iter::once(format!(
                "NOT coalesce({LAST_COMMIT_US} > ${}::int8, false)",
                first + 2
            ))
            .chain(columns.iter().enumerate().map(|(n, &c)| {
                format!(
                    "{} IS NOT DISTINCT FROM {v}.o{}",
                    as_output(&t.columns[c]),
                    n + 1
                )
            }))
            .collect::<Vec<_>>()
            .join(" AND "),
        };
        let write = match write {
            Shape::Update { set } => format!(
                "UPDATE {} t SET {} FROM {v}",
                t.qualified(),
                set.iter()
                    .enumerate()
                    .map(|(n, &c)| format!("{} = {v}.s{}", col(c), n + 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!("DELETE FROM {} t USING {v}", t.qualified()),
        };
        format!(
            "{v} ({}) AS (VALUES {values}), \
             w{suffix} AS ({write} WHERE {key_matches} AND ({LAST_ORIGIN_ID} = ${}::oid OR ({same_image})) RETURNING 1)",
            names.join(", "),
            first + 1
        )
    }
}

/// Several writes of one transaction in one statement: the common table expressions
/// that make them (named after their place, parameters numbered from `$first+1` in
/// `parts` order, each write's [`RowWrite::params`] in turn) and the condition that
/// holds if every guarded write wrote all its rows (`true` if there is none). Only
/// [`Shape::Insert`] and [`Shape::Guarded`] can be parts. Every part sees the rows as
/// they were before the statement, and the order in which the parts run is PostgreSQL's
/// to choose: parts must write different rows.
///
/// With `every_part_checked`, the condition reads every part, inserts too (they return a
/// row per row and are counted; an insert that fails fails the statement, so their count
/// always holds): whatever needs the condition's value then runs after every part.
/// Otherwise an insert, which nothing reads, runs when the statement ends.
pub fn combined_ctes(
    parts: &[(&RelationMap, &RowWrite)],
    first: usize,
    every_part_checked: bool,
) -> (String, String) {
    let mut ctes = Vec::with_capacity(parts.len());
    let mut checks = Vec::new();
    let mut first = first;
    for (n, (map, write)) in parts.iter().enumerate() {
        match &write.shape {
            Shape::Insert { columns, rows } => {
                let returning = if every_part_checked {
                    " RETURNING 1"
                } else {
                    ""
                };
                ctes.push(format!(
                    "i{n} AS ({}{returning})",
                    map.insert_sql(columns, *rows, first)
                ));
                if every_part_checked {
                    checks.push(format!("(SELECT count(*) FROM i{n}) = {rows}"));
                }
            }
            Shape::Guarded {
                write,
                compared,
                rows,
            } => {
                let suffix = n.to_string();
                ctes.push(map.guarded_ctes(write, compared.as_deref(), *rows, first, &suffix));
                checks.push(format!("(SELECT count(*) FROM w{n}) = {rows}"));
            }
            other => unreachable!("{other:?} cannot be part of a combined statement"),
        }
        first += write.params.len();
    }
    let check = if checks.is_empty() {
        "true".to_string()
    } else {
        checks.join(" AND ")
    };
    (ctes.join(", "), check)
}

/// Rows of `t` whose `columns` equal `$1..$n`, locked: every column as text, then the
/// last writer's origin name and commit time (see [`Shape::ReadLocal`]).
///
/// The version is computed in the select list, from the row that was locked. When the
/// lock had to wait for a concurrent writer (another link applying into this node),
/// PostgreSQL returns the row as that writer left it, re-evaluating the select list on
/// it; a join would keep what it had read from the row's older version (EvalPlanQual
/// re-uses the other relations' rows), so the version would be stale and the decision
/// wrong.
fn read_locked(t: &TargetTable, condition: &str) -> String {
    format!(
        "SELECT {}, \
           (SELECT r.roname::text FROM pg_replication_origin r WHERE r.roident = {LAST_ORIGIN_ID}), \
           {LAST_COMMIT_US} \
         FROM {} t \
         WHERE {condition} FOR UPDATE OF t",
        t.columns
            .iter()
            .map(|c| as_output(c))
            .collect::<Vec<_>>()
            .join(", "),
        t.qualified(),
    )
}

/// The `roident` of the origin that last wrote row `t` (0: written here; NULL: its
/// transaction has not committed or its commit time is no longer known).
const LAST_ORIGIN_ID: &str = "(pg_xact_commit_timestamp_origin(t.xmin)).roident";
/// The commit time of the transaction that last wrote row `t`, in µs since 2000-01-01.
const LAST_COMMIT_US: &str =
    "((extract(epoch FROM (pg_xact_commit_timestamp_origin(t.xmin)).timestamp) \
     * 1000000)::int8 - 946684800000000)";

/// Column `column` of row `t` as text, as the walsender prints a change's values: the
/// type's output function (`format('%s', ..)`), not the cast to text (`true::text` is
/// 'true' where the output is 't', and `inet::text` adds a netmask the output leaves
/// out); NULL stays NULL.
fn as_output(column: &str) -> String {
    let c = quote_ident(column);
    format!("CASE WHEN t.{c} IS NULL THEN NULL ELSE pg_catalog.format('%s', t.{c}) END")
}

/// The first row (`tableoid`, `ctid`: unique also across a partitioned table's
/// partitions) whose `compared` columns print as `$first+1..` do, locked. A keyless
/// table may hold equal rows: one of them is changed, as PostgreSQL's own apply does.
fn one_row_by_image(t: &TargetTable, compared: &[usize], first: usize) -> String {
    let matches = compared
        .iter()
        .enumerate()
        .map(|(n, &c)| {
            format!(
                "{} IS NOT DISTINCT FROM ${}::text",
                as_output(&t.columns[c]),
                first + n + 1
            )
        })
        .collect::<Vec<_>>();
    let filter = if matches.is_empty() {
        "true".to_string()
    } else {
        matches.join(" AND ")
    };
    format!(
        "SELECT t.tableoid, t.ctid FROM {} t WHERE {filter} LIMIT 1 FOR UPDATE",
        t.qualified()
    )
}

/// `columns` of the row `t` equal `$1..$n`.
fn columns_equal(t: &TargetTable, columns: &[usize]) -> String {
    columns
        .iter()
        .enumerate()
        .map(|(n, &k)| format!("t.{} = ${}", quote_ident(&t.columns[k]), n + 1))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The row `t` holds what the incoming row (its values of `unique.columns` in
/// `$1..$n`) would hold in the index `unique`: the index's key expressions are equal on
/// both, and both satisfy its predicate. The incoming row is a derived table whose
/// columns carry the table's column names, so the index's own SQL reads it unchanged.
/// NULL keys never match (`=`), as in a unique index.
fn index_collides(t: &TargetTable, unique: &UniqueKey) -> String {
    let lookup = unique
        .lookup
        .as_ref()
        .expect("ReadByIndex is made only for keys with a lookup");
    let keys = lookup.keys.join(", ");
    let incoming = unique
        .columns
        .iter()
        .zip(&lookup.types)
        .enumerate()
        .map(|(n, (&c, ty))| format!("${}::{ty} AS {}", n + 1, quote_ident(&t.columns[c])))
        .collect::<Vec<_>>()
        .join(", ");
    let (inner, outer) = match &lookup.predicate {
        Some(p) => (format!(" WHERE {p}"), format!(" AND ({p})")),
        None => (String::new(), String::new()),
    };
    format!("({keys}) = (SELECT {keys} FROM (SELECT {incoming}) incoming{inner}){outer}")
}

/// PostgreSQL's limit on parameters in one statement (the protocol's Int16 count).
pub const MAX_PARAMS: usize = 65535;

/// How a run of `rows` inserts of `columns` columns is split into multi-row INSERTs: a
/// run of up to [`EXACT_BATCH_ROWS`] rows in one statement (the common point-of-sale
/// transaction), longer runs in powers of two, largest first, so that each relation needs
/// a bounded number of prepared statements; each within PostgreSQL's 65,535 parameters.
pub fn batch_sizes(rows: usize, columns: usize) -> Vec<usize> {
    let floor_pow2 = |n: usize| 1usize << (usize::BITS - 1 - n.leading_zeros());
    let max_rows = (MAX_PARAMS / columns.max(1)).max(1);
    let mut sizes = Vec::new();
    let mut left = rows;
    while left > 0 {
        let n = if left <= EXACT_BATCH_ROWS.min(max_rows) {
            left
        } else {
            floor_pow2(left).min(floor_pow2(max_rows))
        };
        sizes.push(n);
        left -= n;
    }
    sizes
}

/// Runs up to this many rows go in one statement of exactly their size.
pub const EXACT_BATCH_ROWS: usize = 16;

/// Appends one row in COPY text format: tab-separated, `\N` for NULL, with backslash,
/// tab, newline and carriage return escaped (PostgreSQL docs, COPY, "Text Format").
/// Returns false (and appends nothing) if a value cannot travel as text (binary, TOAST).
pub fn copy_text_row(params: &[Value], out: &mut bytes::BytesMut) -> bool {
    if params
        .iter()
        .any(|v| matches!(v, Value::Binary(_) | Value::UnchangedToast))
    {
        return false;
    }
    for (i, v) in params.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\t");
        }
        match v {
            Value::Text(b) => {
                for &c in b.iter() {
                    match c {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        _ => out.extend_from_slice(&[c]),
                    }
                }
            }
            _ => out.extend_from_slice(b"\\N"),
        }
    }
    out.extend_from_slice(b"\n");
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, ReplicaIdentity};
    use bytes::Bytes;

    fn relation(cols: &[(&str, bool)]) -> Relation {
        Relation {
            id: 16384,
            namespace: "public".into(),
            name: "pos_order".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|(n, k)| Column {
                    is_key: *k,
                    name: n.to_string(),
                    type_oid: 23,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn target(cols: &[&str], key: &[usize]) -> TargetTable {
        TargetTable {
            uniques: Vec::new(),
            schema: "public".into(),
            name: "pos_order".into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            types: cols.iter().map(|_| "text".to_string()).collect(),
            key: key.to_vec(),
        }
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn columns_are_matched_by_name_whatever_their_order() {
        let map = RelationMap::new(
            &relation(&[("id", true), ("name", false)]),
            target(&["name", "note", "id"], &[2]),
        )
        .unwrap();
        let w = map.insert(&Tuple(vec![t("7"), t("Shop/0007")])).unwrap();
        assert_eq!(
            map.sql(&w.shape),
            r#"INSERT INTO "public"."pos_order" ("id", "name") VALUES ($1, $2)"#
        );
        assert_eq!(w.params, vec![t("7"), t("Shop/0007")]);
    }

    #[test]
    fn counters_move_by_the_change_and_other_columns_follow_the_decision() {
        let map = RelationMap::new(
            &relation(&[("id", true), ("name", false), ("qty", false)]),
            target(&["id", "name", "qty"], &[0]),
        )
        .unwrap();
        let old = Tuple(vec![t("1"), t("Soap"), t("100")]);
        let new = Tuple(vec![t("1"), t("Soap!"), t("97")]);
        let w = map
            .update_counters(&old, &new, &[2], true)
            .unwrap()
            .unwrap();
        assert_eq!(
            map.sql(&w.shape),
            r#"UPDATE "public"."pos_order" SET "id" = $1, "name" = $2, "qty" = "qty" + ($3::text::numeric - $4::text::numeric) WHERE "id" = $5"#
        );
        assert_eq!(
            w.params,
            vec![t("1"), t("Soap!"), t("97"), t("100"), t("1")]
        );
        let w = map
            .update_counters(&old, &new, &[2], false)
            .unwrap()
            .unwrap();
        assert_eq!(
            w.params,
            vec![t("97"), t("100"), t("1")],
            "only the counter when the rest lost"
        );
        assert!(map
            .update_counters(&old, &old, &[2], false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn writes_of_one_transaction_combine_into_one_statement_numbering_their_parameters_in_turn() {
        let mut target = target(&["id", "name"], &[0]);
        target.types = vec!["integer".into(), "text".into()];
        let map = RelationMap::new(&relation(&[("id", true), ("name", false)]), target).unwrap();
        let insert = RowWrite {
            shape: Shape::Insert {
                columns: vec![0, 1],
                rows: 2,
            },
            params: vec![t("1"), t("Soap"), t("2"), t("Tea")],
        };
        let old = OldTuple::Full(Tuple(vec![t("3"), t("Soap")]));
        let write = map
            .update(Some(&old), &Tuple(vec![t("3"), t("Tea")]))
            .unwrap()
            .unwrap();
        let guarded = map.guarded(write, Some(&old), &[], 7, 123);
        // Five parameters before the parts; the insert's four, the guarded write's two
        // shared and five of its row.
        let (ctes, check) = combined_ctes(&[(&map, &insert), (&map, &guarded)], 5, false);
        assert!(
            ctes.starts_with(
                r#"i0 AS (INSERT INTO "public"."pos_order" ("id", "name") VALUES ($6, $7), ($8, $9)), v1 (s1, s2, k1, o1, o2) AS (VALUES ($12::integer, $13::text, $14::integer, $15::text, $16::text)), w1 AS (UPDATE "public"."pos_order" t SET "id" = v1.s1, "name" = v1.s2 FROM v1 WHERE t."id" = v1.k1 AND ((pg_xact_commit_timestamp_origin(t.xmin)).roident = $10::oid OR (NOT coalesce("#
            ),
            "{ctes}"
        );
        assert!(ctes.contains(" > $11::int8, false)"), "{ctes}");
        assert!(
            ctes.ends_with(" IS NOT DISTINCT FROM v1.o2)) RETURNING 1)"),
            "{ctes}"
        );
        assert_eq!(guarded.params.len(), 7);
        assert_eq!(check, "(SELECT count(*) FROM w1) = 1");
        // The statement of the guarded write alone is what it was.
        assert!(map.sql(&guarded.shape).starts_with(
            r#"WITH v (s1, s2, k1, o1, o2) AS (VALUES ($3::integer, $4::text, $5::integer, $6::text, $7::text)), w AS (UPDATE"#
        ));
        let (_, check) = combined_ctes(&[(&map, &insert)], 5, false);
        assert_eq!(check, "true", "inserts fail by themselves");
        // On one of several sessions every part is read by the check, so that what
        // waits on it (the order lock) comes after them.
        let (ctes, check) = combined_ctes(&[(&map, &insert), (&map, &guarded)], 5, true);
        assert!(
            ctes.starts_with(
                r#"i0 AS (INSERT INTO "public"."pos_order" ("id", "name") VALUES ($6, $7), ($8, $9) RETURNING 1), v1 "#
            ),
            "{ctes}"
        );
        assert_eq!(
            check,
            "(SELECT count(*) FROM i0) = 2 AND (SELECT count(*) FROM w1) = 1"
        );
    }

    #[test]
    fn a_guarded_write_compares_what_the_change_carries_and_fails_unless_every_row_is_written() {
        let mut target = target(&["note", "id", "name"], &[1]);
        target.types = vec!["text".into(), "integer".into(), "public.label".into()];
        let map = RelationMap::new(
            &relation(&[("id", true), ("name", false), ("note", false)]),
            target,
        )
        .unwrap();
        let old = OldTuple::Full(Tuple(vec![t("1"), Value::Null, Value::UnchangedToast]));
        let new = Tuple(vec![t("1"), t("Soap"), Value::UnchangedToast]);
        let write = map.update(Some(&old), &new).unwrap().unwrap();
        let g = map.guarded(write, Some(&old), &[], 7, 123);
        assert_eq!(
            g.shape,
            Shape::Guarded {
                write: Box::new(Shape::Update { set: vec![1, 2] }),
                // The note's old value did not travel (unchanged TOAST): not compared.
                compared: Some(vec![1, 2]),
                rows: 1,
            }
        );
        assert_eq!(g.shape.shared_params(), 2);
        assert_eq!(
            g.params,
            vec![
                t("7"),
                t("123"),
                t("1"),
                t("Soap"),
                t("1"),
                t("1"),
                Value::Null
            ]
        );
        let two = Shape::Guarded {
            write: Box::new(Shape::Update { set: vec![1, 2] }),
            compared: Some(vec![1, 2]),
            rows: 2,
        };
        let sql = map.sql(&two);
        let expected = [
            r#"WITH v (s1, s2, k1, o1, o2) AS (VALUES ($3::integer, $4::public.label, $5::integer, $6::text, $7::text), "#,
            r#"($8::integer, $9::public.label, $10::integer, $11::text, $12::text)), "#,
            r#"w AS (UPDATE "public"."pos_order" t SET "id" = v.s1, "name" = v.s2 FROM v WHERE t."id" = v.k1 "#,
            r#"AND ((pg_xact_commit_timestamp_origin(t.xmin)).roident = $1::oid OR (NOT coalesce("#,
        ]
        .concat();
        assert!(sql.starts_with(&expected), "{sql}");
        assert!(sql.contains(r#" > $2::int8, false) AND CASE WHEN t."id" IS NULL THEN NULL ELSE pg_catalog.format('%s', t."id") END IS NOT DISTINCT FROM v.o1 AND CASE WHEN t."name" IS NULL"#), "{sql}");
        assert!(
            sql.ends_with(
                r#" IS NOT DISTINCT FROM v.o2)) RETURNING 1) SELECT 1 / (count(*) = 2)::int FROM w"#
            ),
            "{sql}"
        );

        // A per-node column is not compared; a key-only old image compares nothing.
        let write = map.update(Some(&old), &new).unwrap().unwrap();
        let g = map.guarded(write, Some(&old), &[1], 7, 123);
        assert!(matches!(&g.shape, Shape::Guarded { compared: Some(c), .. } if c == &vec![1]));
        let key_only = OldTuple::Key(Tuple(vec![t("1"), Value::Null, Value::Null]));
        let g = map.guarded(map.delete(&key_only).unwrap(), Some(&key_only), &[], 7, 123);
        assert_eq!(g.params, vec![t("7"), t("1")]);
        assert_eq!(g.shape.shared_params(), 1);
        assert_eq!(
            map.sql(&g.shape),
            r#"WITH v (k1) AS (VALUES ($2::integer)), w AS (DELETE FROM "public"."pos_order" t USING v WHERE t."id" = v.k1 AND ((pg_xact_commit_timestamp_origin(t.xmin)).roident = $1::oid OR (false)) RETURNING 1) SELECT 1 / (count(*) = 1)::int FROM w"#
        );
    }

    #[test]
    fn several_rows_go_in_one_insert() {
        let map = RelationMap::new(
            &relation(&[("id", true), ("name", false)]),
            target(&["id", "name"], &[0]),
        )
        .unwrap();
        let sql = map.sql(&Shape::Insert {
            columns: vec![0, 1],
            rows: 3,
        });
        assert_eq!(
            sql,
            r#"INSERT INTO "public"."pos_order" ("id", "name") VALUES ($1, $2), ($3, $4), ($5, $6)"#
        );
    }

    #[test]
    fn batch_sizes_cover_a_run_and_respect_the_parameter_limit() {
        for run in 1..600 {
            for cols in [1, 7, 300] {
                let sizes = batch_sizes(run, cols);
                assert_eq!(sizes.iter().sum::<usize>(), run);
                assert!(sizes
                    .iter()
                    .all(|&n| (n <= EXACT_BATCH_ROWS || n.is_power_of_two())
                        && n * cols <= MAX_PARAMS));
            }
        }
        assert_eq!(batch_sizes(10, 7), [10]);
        assert_eq!(batch_sizes(100, 7), [64, 32, 4]);
    }

    #[test]
    fn update_leaves_unchanged_toast_out_and_finds_the_row_by_its_old_key() {
        let map = RelationMap::new(
            &relation(&[("id", true), ("body", false), ("n", false)]),
            target(&["id", "body", "n"], &[0]),
        )
        .unwrap();
        let old = OldTuple::Key(Tuple(vec![t("1"), Value::Null, Value::Null]));
        let w = map
            .update(
                Some(&old),
                &Tuple(vec![t("2"), Value::UnchangedToast, Value::Null]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            map.sql(&w.shape),
            r#"UPDATE "public"."pos_order" SET "id" = $1, "n" = $2 WHERE "id" = $3"#
        );
        assert_eq!(w.params, vec![t("2"), Value::Null, t("1")]);
    }

    #[test]
    fn update_without_old_tuple_uses_the_new_key() {
        let map = RelationMap::new(
            &relation(&[("id", true), ("n", false)]),
            target(&["id", "n"], &[0]),
        )
        .unwrap();
        let w = map
            .update(None, &Tuple(vec![t("5"), t("x")]))
            .unwrap()
            .unwrap();
        assert_eq!(w.params, vec![t("5"), t("x"), t("5")]);
    }

    #[test]
    fn delete_with_full_old_tuple_uses_the_target_primary_key_only() {
        let map = RelationMap::new(
            &relation(&[("a", true), ("b", true)]),
            target(&["a", "b"], &[1]),
        )
        .unwrap();
        let w = map
            .delete(&OldTuple::Full(Tuple(vec![t("1"), t("2")])))
            .unwrap();
        assert_eq!(
            map.sql(&w.shape),
            r#"DELETE FROM "public"."pos_order" WHERE "b" = $1"#
        );
        assert_eq!(w.params, vec![t("2")]);
    }

    #[test]
    fn schema_differences_are_named() {
        let err = RelationMap::new(
            &relation(&[("id", true), ("extra", false)]),
            target(&["id"], &[0]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"extra\""), "{err}");
        let keyless = RelationMap::new(&relation(&[("id", true)]), target(&["id"], &[])).unwrap();
        assert!(keyless.is_keyless());
        assert!(matches!(
            keyless.delete_by_image(&OldTuple::Key(Tuple(vec![t("1")]))),
            Err(StatementError::NoOldImage { .. })
        ));
        let map = RelationMap::new(&relation(&[("id", true)]), target(&["id"], &[0])).unwrap();
        assert!(
            map.insert(&Tuple(vec![t("1"), t("2")])).is_err(),
            "wider tuple than relation"
        );
    }

    #[test]
    fn a_keyless_tables_rows_are_found_by_their_whole_old_image_one_at_a_time() {
        let map = RelationMap::new(
            &relation(&[("msg", false), ("at", false), ("body", false)]),
            target(&["msg", "at", "body"], &[]),
        )
        .unwrap();
        let old = OldTuple::Full(Tuple(vec![t("hello"), Value::Null, Value::UnchangedToast]));
        let w = map
            .update_by_image(
                Some(&old),
                &Tuple(vec![t("bye"), t("2026-12-07"), Value::UnchangedToast]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            map.sql(&w.shape),
            "UPDATE \"public\".\"pos_order\" SET \"msg\" = $1, \"at\" = $2 WHERE (tableoid, ctid) = \
             (SELECT t.tableoid, t.ctid FROM \"public\".\"pos_order\" t WHERE \
             CASE WHEN t.\"msg\" IS NULL THEN NULL ELSE pg_catalog.format('%s', t.\"msg\") END IS NOT DISTINCT FROM $3::text \
             AND CASE WHEN t.\"at\" IS NULL THEN NULL ELSE pg_catalog.format('%s', t.\"at\") END IS NOT DISTINCT FROM $4::text \
             LIMIT 1 FOR UPDATE)"
        );
        assert_eq!(
            w.params,
            vec![t("bye"), t("2026-12-07"), t("hello"), Value::Null]
        );
        let d = map.delete_by_image(&old).unwrap();
        assert_eq!(
            map.sql(&d.shape),
            "DELETE FROM \"public\".\"pos_order\" WHERE (tableoid, ctid) = \
             (SELECT t.tableoid, t.ctid FROM \"public\".\"pos_order\" t WHERE \
             CASE WHEN t.\"msg\" IS NULL THEN NULL ELSE pg_catalog.format('%s', t.\"msg\") END IS NOT DISTINCT FROM $1::text \
             AND CASE WHEN t.\"at\" IS NULL THEN NULL ELSE pg_catalog.format('%s', t.\"at\") END IS NOT DISTINCT FROM $2::text \
             LIMIT 1 FOR UPDATE)"
        );
        assert_eq!(d.params, vec![t("hello"), Value::Null]);
        assert!(
            map.update_by_image(None, &Tuple(vec![t("a"), t("b"), t("c")]))
                .is_err(),
            "no old row: nothing to find the row by"
        );
    }

    #[test]
    fn copy_rows_escape_what_copy_text_format_needs() {
        let mut out = bytes::BytesMut::new();
        assert!(copy_text_row(
            &[t("a\tb\\c\nd\re"), Value::Null, t("\\N")],
            &mut out
        ));
        assert_eq!(&out[..], b"a\\tb\\\\c\\nd\\re\t\\N\t\\\\N\n");
        let before = out.len();
        assert!(!copy_text_row(
            &[Value::Binary(Bytes::from_static(b"\x01"))],
            &mut out
        ));
        assert_eq!(out.len(), before, "nothing appended for a binary value");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }
}
