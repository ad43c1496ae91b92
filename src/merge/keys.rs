//! One entity created on two nodes: how a unique collision is settled, which of two
//! merged rows stays, and the key map that sends later references of a merged-away row
//! to the row that stayed (decision 0008). Pure: the applier reads the rows and writes.

use std::collections::HashMap;

use crate::pgoutput::{Tuple, Value};

/// `(schema, table)` of a target table.
pub type TableName = (String, String);

/// One merge: the table, the merged-away key and the key it merged into.
pub type MergeEntry = (TableName, Vec<String>, Vec<String>);

/// How a collision on one unique index (other than the primary key) is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Both rows stay; the loser's value in this text column (a target column index,
    /// with its `varchar(n)` limit) is renamed (decision 0004).
    Rename { column: usize, limit: Option<usize> },
    /// The two rows are one thing: the one with the smaller primary key stays
    /// ([`stays`]), rows pointing at the other are re-pointed at it, the other goes.
    Merge,
    /// No rule settles it: the incoming row is parked (decision 0007).
    Park { why: &'static str },
}

/// What the table's policy says of its unique indexes (`[[tables]]`).
#[derive(Debug, Clone, Copy, Default)]
pub struct UniquePolicy<'a> {
    /// `park_unique`: these park their collisions.
    pub park: &'a [String],
    /// `merge_unique`: these merge, even when they have a text column to rename.
    pub merge: &'a [String],
}

/// The settlement of a collision on the index `index`: the policy's choice if it names
/// the index; otherwise rename where the key has a text column, merge where it has none
/// (a key of references and numbers names one entity: `res_users_settings (user_id)`).
/// Merging needs the table's primary key (`has_key`) to point references at.
pub fn settlement(
    index: &str,
    renamable: Option<(usize, Option<usize>)>,
    has_key: bool,
    policy: UniquePolicy<'_>,
) -> Settlement {
    let named = |list: &[String]| list.iter().any(|n| n == index);
    if named(policy.park) {
        return Settlement::Park {
            why: "the table's policy parks collisions on this key (park_unique)",
        };
    }
    match (renamable, named(policy.merge)) {
        (_, true) | (None, false) if has_key => Settlement::Merge,
        (Some((column, limit)), false) => Settlement::Rename { column, limit },
        _ => Settlement::Park {
            why: "the table has no primary key to merge the two rows by",
        },
    }
}

/// Whether the row with primary key `a` stays when it merges with the row with key `b`:
/// the smaller key stays, compared column by column (as numbers when both are integers).
/// Keys never change, so every node picks the same row whatever was edited since.
pub fn stays(a: &[String], b: &[String]) -> bool {
    for (x, y) in a.iter().zip(b) {
        let order = match (x.parse::<i128>(), y.parse::<i128>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if order != std::cmp::Ordering::Equal {
            return order.is_lt();
        }
    }
    true
}

/// Every merge a node knows: per table, merged-away primary key -> the key it merged
/// into (as text, in primary key order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMap {
    tables: HashMap<TableName, HashMap<Vec<String>, Vec<String>>>,
}

impl KeyMap {
    /// Notes that `loser` merged into `winner`. A loser already known keeps its first
    /// entry: both lead to the same row (every node picks the same winner).
    pub fn insert(&mut self, table: TableName, loser: Vec<String>, winner: Vec<String>) {
        if loser != winner {
            self.tables
                .entry(table)
                .or_default()
                .entry(loser)
                .or_insert(winner);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tables.values().map(HashMap::len).sum()
    }

    /// Every merge: table, merged-away key, the key it merged into.
    pub fn entries(&self) -> impl Iterator<Item = (TableName, Vec<String>, Vec<String>)> + '_ {
        self.tables.iter().flat_map(|(t, m)| {
            m.iter()
                .map(move |(l, w)| (t.clone(), l.clone(), w.clone()))
        })
    }

    pub fn has_table(&self, table: &TableName) -> bool {
        self.tables.contains_key(table)
    }

    /// The row a reference to `key` must point at now: `None` if `key` was never merged
    /// away; else the end of its chain (A merged into B, then B into C: C).
    pub fn resolve(&self, table: &TableName, key: &[String]) -> Option<Vec<String>> {
        let merged = self.tables.get(table)?;
        let mut at = merged.get(key)?;
        // A chain is at most as long as the map; a cycle (impossible with `stays`, but
        // the map is also read from the database) ends there.
        for _ in 0..merged.len() {
            match merged.get(at) {
                Some(next) if next != key => at = next,
                _ => break,
            }
        }
        Some(at.clone())
    }
}

/// A foreign key of a relation into another table's primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    /// Source column indexes of the referencing columns, in the referenced key's order.
    pub columns: Vec<usize>,
    pub references: TableName,
}

/// Points the references `fks` of `tuple` (source column order) that name a merged-away
/// row at the row it merged into. Returns whether anything changed. NULLs and values
/// not sent are left as they are.
pub fn redirect(tuple: &mut Tuple, fks: &[ForeignKey], map: &KeyMap) -> bool {
    let mut changed = false;
    for fk in fks.iter().filter(|fk| map.has_table(&fk.references)) {
        let key: Option<Vec<String>> = fk
            .columns
            .iter()
            .map(|&c| tuple.0.get(c)?.as_text().map(str::to_string))
            .collect();
        let Some(winner) = key.and_then(|k| map.resolve(&fk.references, &k)) else {
            continue;
        };
        for (&c, v) in fk.columns.iter().zip(winner) {
            tuple.0[c] = Value::Text(bytes::Bytes::from(v.into_bytes()));
        }
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn t(name: &str) -> TableName {
        ("public".into(), name.into())
    }

    #[test]
    fn a_key_without_text_merges_and_one_with_text_renames_unless_the_policy_says() {
        let none = UniquePolicy::default();
        assert_eq!(settlement("u", None, true, none), Settlement::Merge);
        assert_eq!(
            settlement("u", Some((2, None)), true, none),
            Settlement::Rename {
                column: 2,
                limit: None
            }
        );
        let merge = s(&["followers_uniq"]);
        let policy = UniquePolicy {
            park: &[],
            merge: &merge,
        };
        assert_eq!(
            settlement("followers_uniq", Some((1, Some(64))), true, policy),
            Settlement::Merge
        );
        let park = s(&["u"]);
        let parks = UniquePolicy {
            park: &park,
            merge: &[],
        };
        assert!(matches!(
            settlement("u", None, true, parks),
            Settlement::Park { .. }
        ));
        assert!(matches!(
            settlement("u", None, false, none),
            Settlement::Park { .. }
        ));
    }

    #[test]
    fn the_smaller_key_stays_numbers_compared_as_numbers() {
        assert!(stays(&s(&["9"]), &s(&["10"])), "9 < 10, not as text");
        assert!(!stays(&s(&["10"]), &s(&["9"])));
        assert!(stays(&s(&["1", "b"]), &s(&["1", "c"])));
        assert!(stays(&s(&["abc"]), &s(&["abd"])));
        // Exactly one of two different keys stays, whichever node asks.
        for (a, b) in [(s(&["101"]), s(&["202"])), (s(&["x"]), s(&["-1"]))] {
            assert_ne!(stays(&a, &b), stays(&b, &a));
        }
    }

    #[test]
    fn a_chain_of_merges_resolves_to_its_last_row() {
        let mut m = KeyMap::default();
        assert!(m.is_empty());
        m.insert(t("s"), s(&["1"]), s(&["2"]));
        m.insert(t("s"), s(&["2"]), s(&["3"]));
        m.insert(t("s"), s(&["1"]), s(&["9"])); // first entry kept
        m.insert(t("s"), s(&["4"]), s(&["4"])); // not a merge
        assert_eq!(m.len(), 2);
        assert_eq!(m.resolve(&t("s"), &s(&["1"])), Some(s(&["3"])));
        assert_eq!(m.resolve(&t("s"), &s(&["2"])), Some(s(&["3"])));
        assert_eq!(m.resolve(&t("s"), &s(&["3"])), None);
        assert_eq!(m.resolve(&t("other"), &s(&["1"])), None);
        // A cycle read from a damaged table ends instead of looping.
        m.insert(t("c"), s(&["5"]), s(&["6"]));
        m.insert(t("c"), s(&["6"]), s(&["5"]));
        assert!(m.resolve(&t("c"), &s(&["5"])).is_some());
    }

    #[test]
    fn references_to_a_merged_row_are_pointed_at_the_row_that_stayed() {
        let mut m = KeyMap::default();
        m.insert(t("settings"), s(&["202"]), s(&["101"]));
        let text = |v: &str| Value::Text(bytes::Bytes::from(v.to_string()));
        let fks = vec![ForeignKey {
            columns: vec![1],
            references: t("settings"),
        }];
        let mut row = Tuple(vec![text("7"), text("202"), text("x")]);
        assert!(redirect(&mut row, &fks, &m));
        assert_eq!(row, Tuple(vec![text("7"), text("101"), text("x")]));
        // Another key, a NULL and an unsent value stay.
        for v in [text("303"), Value::Null, Value::UnchangedToast] {
            let mut row = Tuple(vec![text("7"), v.clone(), text("x")]);
            assert!(!redirect(&mut row, &fks, &m));
            assert_eq!(row.0[1], v);
        }
    }
}
