//! What each peer may write on this node (`[[peers]] writes`): the tables whose rows a
//! node's transactions may change here. A change outside its author's scope is not
//! applied; the applier records it (`out_of_scope`) and the link goes on.
//!
//! A scope is a list of patterns over `schema.table`: a pattern without a schema means
//! `public.`, and `*` stands for any run of characters (`pos_*`, `stock.*`). walsync's
//! own replicated bookkeeping (the DDL log, merge notes) is never in or out of a scope:
//! its rows are checked for their author instead (`conflict::note_is_authentic`,
//! `ddl::verdict`).

use std::collections::HashMap;

/// One pattern of a scope, split into its schema and table parts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    schema: String,
    table: String,
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let (schema, table) = match text.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("public", text),
        };
        if schema.is_empty() || table.is_empty() || table.contains('.') {
            return Err(format!(
                "{text:?} is not a table pattern: write \"table\", \"schema.table\" or a pattern such as \"pos_*\""
            ));
        }
        Ok(Pattern {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    fn matches(&self, schema: &str, table: &str) -> bool {
        glob(&self.schema, schema) && glob(&self.table, table)
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text.ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// The tables one node may write here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteScope {
    patterns: Vec<Pattern>,
}

impl WriteScope {
    /// The scope of the patterns `texts`; an error names the first malformed one.
    pub fn parse(texts: &[String]) -> Result<WriteScope, String> {
        let patterns = texts
            .iter()
            .map(|t| Pattern::parse(t))
            .collect::<Result<_, _>>()?;
        Ok(WriteScope { patterns })
    }

    pub fn allows(&self, schema: &str, table: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(schema, table))
    }
}

/// Every scope this node sets, by the author's replication origin name
/// (`walsync_<node>`). An author without one may write every replicated table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteScopes {
    by_origin: HashMap<String, WriteScope>,
}

impl WriteScopes {
    pub fn new(by_origin: HashMap<String, WriteScope>) -> WriteScopes {
        WriteScopes { by_origin }
    }

    pub fn is_empty(&self) -> bool {
        self.by_origin.is_empty()
    }

    /// Whether a transaction authored by `origin` may change `schema.table` here.
    pub fn allows(&self, origin: &str, schema: &str, table: &str) -> bool {
        schema == "walsync"
            || self
                .by_origin
                .get(origin)
                .is_none_or(|s| s.allows(schema, table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(patterns: &[&str]) -> WriteScope {
        WriteScope::parse(&patterns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_pattern_without_a_schema_means_public() {
        let s = scope(&["res_partner"]);
        assert!(s.allows("public", "res_partner"));
        assert!(!s.allows("shop", "res_partner"));
        assert!(!s.allows("public", "res_partner_bank"));
    }

    #[test]
    fn stars_stand_for_any_run_of_characters() {
        let s = scope(&["pos_*", "stock.*", "public.*_line", "a*b*c"]);
        for (schema, table) in [
            ("public", "pos_order"),
            ("public", "pos_"),
            ("stock", "move"),
            ("public", "sale_order_line"),
            ("public", "abc"),
            ("public", "axxbyyc"),
        ] {
            assert!(s.allows(schema, table), "{schema}.{table}");
        }
        for (schema, table) in [
            ("public", "account_move"),
            ("shop", "pos_order"),
            ("public", "line_item"),
            ("public", "ab"),
            ("public", "acb"),
            ("public", "pos"),
        ] {
            assert!(!s.allows(schema, table), "{schema}.{table}");
        }
    }

    #[test]
    fn a_malformed_pattern_is_named() {
        for bad in ["", ".x", "x.", "a.b.c"] {
            let err = WriteScope::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn authors_without_a_scope_and_walsyncs_own_rows_always_pass() {
        let scopes = WriteScopes::new(HashMap::from([(
            "walsync_branch1".to_string(),
            scope(&["pos_*"]),
        )]));
        assert!(scopes.allows("walsync_branch1", "public", "pos_order"));
        assert!(!scopes.allows("walsync_branch1", "public", "res_users"));
        assert!(scopes.allows("walsync_branch1", "walsync", "ddl_log"));
        assert!(scopes.allows("walsync_main", "public", "res_users"));
        assert!(WriteScopes::default().allows("walsync_x", "public", "t"));
    }
}
