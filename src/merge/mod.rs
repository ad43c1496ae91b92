//! Merge: decides, without any I/O, what a source transaction means for the target.
//!
//! It owns the origin filter (loop prevention) and what the link does with each source
//! transaction ([`transaction`]), the choice of which relations travel
//! ([`relation_travels`]), the translation of a decoded row change into the statement and
//! parameters that write it on the target ([`statements`]), the conflict decisions
//! ([`conflict`]) and how a unique collision is settled ([`keys`]): every node must reach
//! the same answer from the same inputs. The applier reads rows and writes; it decides
//! with these.

pub mod conflict;
pub mod keys;
pub mod scope;
pub mod statements;

use crate::lsn::Lsn;
use crate::names::{NameError, NodeName, PgName};

/// The loop-prevention rule of one link `upstream -> downstream`.
///
/// A transaction's author is its `Origin` message if present, else the upstream itself.
/// A link never carries a transaction back to its author; it carries third nodes' writes
/// only when the upstream is the hub of a star ([`crate::config::Topology::Star`]).
#[derive(Debug, Clone)]
pub struct OriginFilter {
    pub upstream: NodeName,
    pub downstream: NodeName,
    pub upstream_forwards_others: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MergeError {
    #[error("transaction carries replication origin {0:?}, which walsync did not create; something other than walsync applies changes on the upstream with origins")]
    ForeignOrigin(String, #[source] NameError),
}

impl OriginFilter {
    /// The node that first wrote a transaction, from its `Origin` message name if any.
    pub fn author(&self, origin: Option<&str>) -> Result<NodeName, MergeError> {
        match origin {
            None => Ok(self.upstream.clone()),
            Some(name) => PgName::parse_origin(name)
                .map_err(|e| MergeError::ForeignOrigin(name.to_string(), e)),
        }
    }

    pub fn forwards(&self, author: &NodeName) -> bool {
        if *author == self.downstream {
            return false;
        }
        *author == self.upstream || self.upstream_forwards_others
    }
}

/// A source transaction this link applies: what the target transaction carries (the
/// author's origin, LSN and commit time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTxn {
    /// Replication origin name of the author on every node (`walsync_<node>`).
    pub origin: String,
    /// The author's LSN for this transaction (its commit LSN on the author).
    pub origin_lsn: Lsn,
    /// The author's commit time, microseconds since 2000-01-01 UTC.
    pub commit_time_us: i64,
}

/// What the link does with a source transaction, decided at its first change: apply it
/// as the returned [`RemoteTxn`], or let it pass (`None`): it was applied here already
/// (its commit starts before the link's recorded `progress`: a resume after a crash), or
/// the origin filter does not carry its author on this link.
pub fn transaction(
    filter: &OriginFilter,
    origin: Option<(&str, Lsn)>,
    final_lsn: Lsn,
    commit_time_us: i64,
    progress: Lsn,
) -> Result<Option<RemoteTxn>, MergeError> {
    let author = filter.author(origin.map(|(n, _)| n))?;
    let already = final_lsn < progress;
    Ok((!already && filter.forwards(&author)).then(|| RemoteTxn {
        origin: PgName::origin_of(&author),
        origin_lsn: origin.map(|(_, l)| l).unwrap_or(final_lsn),
        commit_time_us,
    }))
}

/// Whether a relation's changes are applied on a link: not walsync's own bookkeeping
/// ([`replicates_relation`]), nor a table the config keeps on each node (`local = true`).
pub fn relation_travels(namespace: &str, name: &str, kept_local: bool) -> bool {
    replicates_relation(namespace, name) && !kept_local
}

/// Whether rows of this relation travel between nodes. walsync's own bookkeeping
/// (progress, conflicts, identity) is per node; only the DDL log and the merged keys
/// (decision 0008) travel with the data.
pub fn replicates_relation(namespace: &str, name: &str) -> bool {
    namespace != "walsync" || name == "ddl_log" || name == "merged_keys"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::parse(s).unwrap()
    }

    fn filter(up: &str, down: &str, hub: bool) -> OriginFilter {
        OriginFilter {
            upstream: n(up),
            downstream: n(down),
            upstream_forwards_others: hub,
        }
    }

    #[test]
    fn star_hub_forwards_a_branch_write_to_the_other_branch_only() {
        let to_b2 = filter("main", "branch2", true);
        let to_b1 = filter("main", "branch1", true);
        let author = to_b2.author(Some("walsync_branch1")).unwrap();
        assert_eq!(author, n("branch1"));
        assert!(to_b2.forwards(&author));
        assert!(!to_b1.forwards(&author), "never back to its author");
        assert!(
            to_b1.forwards(&to_b1.author(None).unwrap()),
            "main's own writes go everywhere"
        );
    }

    #[test]
    fn branch_and_mesh_links_carry_only_the_upstreams_own_writes() {
        let b1_to_main = filter("branch1", "main", false);
        assert!(b1_to_main.forwards(&b1_to_main.author(None).unwrap()));
        assert!(!b1_to_main.forwards(&n("main")));
        let mesh = filter("a", "b", false);
        assert!(
            !mesh.forwards(&mesh.author(Some("walsync_c")).unwrap()),
            "c's writes reach b on c -> b"
        );
        assert!(!mesh.forwards(&mesh.author(Some("walsync_b")).unwrap()));
    }

    #[test]
    fn a_transaction_is_applied_once_with_its_authors_origin_lsn_and_time() {
        let f = filter("main", "branch1", true);
        let from_b2 = transaction(&f, Some(("walsync_branch2", Lsn(7))), Lsn(100), 42, Lsn(50))
            .unwrap()
            .expect("a third node's write through the hub");
        assert_eq!(from_b2.origin, "walsync_branch2");
        assert_eq!(from_b2.origin_lsn, Lsn(7), "the author's own commit LSN");
        assert_eq!(from_b2.commit_time_us, 42);
        let mains = transaction(&f, None, Lsn(100), 1, Lsn(50))
            .unwrap()
            .unwrap();
        assert_eq!(
            (mains.origin.as_str(), mains.origin_lsn),
            ("walsync_main", Lsn(100))
        );
        assert_eq!(
            transaction(&f, None, Lsn(40), 1, Lsn(50)).unwrap(),
            None,
            "applied before a crash: its commit starts before the recorded progress"
        );
        assert_eq!(
            transaction(&f, Some(("walsync_branch1", Lsn(7))), Lsn(100), 1, Lsn(50)).unwrap(),
            None,
            "never back to its author"
        );
        assert!(transaction(&f, Some(("pg_1", Lsn(7))), Lsn(100), 1, Lsn(0)).is_err());
    }

    #[test]
    fn an_origin_walsync_did_not_make_is_an_error() {
        assert!(filter("a", "b", false).author(Some("pg_16400")).is_err());
    }

    #[test]
    fn only_the_ddl_log_of_walsyncs_schema_travels() {
        assert!(replicates_relation("public", "pos_order"));
        assert!(replicates_relation("walsync", "ddl_log"));
        assert!(replicates_relation("walsync", "merged_keys"));
        assert!(!replicates_relation("walsync", "link_progress"));
        assert!(!replicates_relation("walsync", "conflicts"));
        assert!(relation_travels("public", "pos_order", false));
        assert!(!relation_travels("public", "bus_bus", true), "kept local");
        assert!(!relation_travels("walsync", "link_progress", false));
    }
}
