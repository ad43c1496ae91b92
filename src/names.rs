//! Names: the ones walsync gives to PostgreSQL objects, made and checked in one place,
//! and the quoting of any name or value put into SQL text. Shared by every layer.
//!
//! A node name is `[a-z][a-z0-9_]*`, at most [`NodeName::MAX_LEN`] bytes, so that every
//! derived name fits PostgreSQL's 63-byte identifier limit (NAMEDATALEN - 1) and needs no
//! quoting. These formats are part of a deployed cluster's state: changing one orphans slots
//! and origins on running nodes.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NameError {
    #[error("node name {0:?} is invalid: use lowercase letters, digits and '_', starting with a letter, at most {max} bytes", max = NodeName::MAX_LEN)]
    InvalidNode(String),
    #[error("{0:?} is not a walsync {1} name")]
    NotOurs(String, &'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// `walsync_to_` (11 bytes) + name must fit in 63 bytes.
    pub const MAX_LEN: usize = 40;

    pub fn parse(s: &str) -> Result<NodeName, NameError> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.as_bytes()[0].is_ascii_lowercase()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(NodeName(s.to_string()))
        } else {
            Err(NameError::InvalidNode(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The one publication every node has (`FOR ALL TABLES`).
pub const PUBLICATION: &str = "walsync";

/// A PostgreSQL object named after a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgName {
    /// The logical slot on a node that feeds the link towards `to`.
    Slot { to: NodeName },
    /// The replication origin that tags rows first written by `node`.
    Origin { node: NodeName },
}

const SLOT_PREFIX: &str = "walsync_to_";
const ORIGIN_PREFIX: &str = "walsync_";

impl PgName {
    pub fn slot_to(to: &NodeName) -> String {
        PgName::Slot { to: to.clone() }.to_string()
    }

    pub fn origin_of(node: &NodeName) -> String {
        PgName::Origin { node: node.clone() }.to_string()
    }

    /// Parses a replication origin name back to the node that authored the change.
    pub fn parse_origin(s: &str) -> Result<NodeName, NameError> {
        let rest = s
            .strip_prefix(ORIGIN_PREFIX)
            .ok_or_else(|| NameError::NotOurs(s.into(), "origin"))?;
        NodeName::parse(rest).map_err(|_| NameError::NotOurs(s.into(), "origin"))
    }
}

impl fmt::Display for PgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PgName::Slot { to } => format!("{SLOT_PREFIX}{to}"),
            PgName::Origin { node } => format!("{ORIGIN_PREFIX}{node}"),
        };
        debug_assert!(
            s.len() <= 63,
            "NodeName::MAX_LEN keeps derived names within 63 bytes"
        );
        f.write_str(&s)
    }
}

/// `s` as an SQL identifier, always quoted (`"a""b"`).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A relation's name as a statement wrote it: `"schema"."name"`, or `"name"` alone where
/// no schema was written (the search_path finds it).
pub fn quote_written(schema: Option<&str>, name: &str) -> String {
    match schema {
        Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(name)),
        None => quote_ident(name),
    }
}

/// `s` as an SQL string literal (`'it''s'`); for the few statements that cannot take
/// parameters.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_relation_name_is_quoted_with_its_schema_if_it_had_one() {
        assert_eq!(quote_written(Some("shop"), "Sale"), r#""shop"."Sale""#);
        assert_eq!(quote_written(None, "a\"b"), r#""a""b""#);
    }

    #[test]
    fn derived_names_fit_postgres_identifiers() {
        let longest = NodeName::parse(&"a".repeat(NodeName::MAX_LEN)).unwrap();
        assert!(PgName::slot_to(&longest).len() <= 63);
        assert!(PgName::origin_of(&longest).len() <= 63);
        assert!(NodeName::parse(&"a".repeat(NodeName::MAX_LEN + 1)).is_err());
    }

    #[test]
    fn node_names_are_plain_identifiers() {
        for bad in ["", "Main", "1branch", "branch-1", "br anch", "é"] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(NodeName::parse("branch_12").is_ok());
    }

    #[test]
    fn origin_names_round_trip() {
        let n = NodeName::parse("branch1").unwrap();
        assert_eq!(PgName::origin_of(&n), "walsync_branch1");
        assert_eq!(PgName::parse_origin("walsync_branch1").unwrap(), n);
        assert!(PgName::parse_origin("pg_16384").is_err());
        assert_eq!(PgName::slot_to(&n), "walsync_to_branch1");
    }
}
