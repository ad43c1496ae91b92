//! Conflict decisions: pure, so that every node decides the same from the same inputs.
//!
//! A version of a row is its last writer's replication origin and commit time. When an
//! incoming change meets a local row written by another origin, and the change was not
//! made on top of that very row (its old image, sent under REPLICA IDENTITY FULL, differs
//! or is unknown), the two versions are concurrent. Between two writes the later commit
//! time wins, ties broken by origin name; a delete wins over a concurrent update whatever
//! the times, because a node that deleted a row keeps no trace of when (decision 0003).
//! Both versions are recorded, whoever wins.

use serde_json::{Map, Value as Json};

use crate::pgoutput::{Tuple, Value};

/// Conflict kinds, named as PostgreSQL 18 names them (`pg_stat_subscription_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    InsertExists,
    UpdateOriginDiffers,
    UpdateMissing,
    DeleteOriginDiffers,
    DeleteMissing,
}

impl ConflictKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert_exists",
            ConflictKind::UpdateOriginDiffers => "update_origin_differs",
            ConflictKind::UpdateMissing => "update_missing",
            ConflictKind::DeleteOriginDiffers => "delete_origin_differs",
            ConflictKind::DeleteMissing => "delete_missing",
        }
    }
}

/// Who last wrote a version: replication origin name (`walsync_<node>`) and commit time
/// in microseconds since 2000-01-01 UTC (`None`: unknown, e.g. written before
/// `track_commit_timestamp` was on; it loses against any known time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub origin: String,
    pub commit_time_us: Option<i64>,
}

/// What to do with an incoming change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not a conflict: apply it.
    Apply,
    /// A conflict the incoming change wins: apply it, record the local version.
    ApplyAndRecord(ConflictKind),
    /// A conflict the local version wins (or nothing to apply to): skip, record the change.
    SkipAndRecord(ConflictKind),
}

/// Last writer wins: later commit time, then the greater origin name.
pub fn remote_wins(remote: &Version, local: &Version) -> bool {
    (remote.commit_time_us, &remote.origin) > (local.commit_time_us, &local.origin)
}

/// An update or delete meeting the local row (`None`: no such row here).
/// `made_on_local` says whether the change's old image equals the local row, i.e. its
/// author saw exactly this version (only known under REPLICA IDENTITY FULL).
pub fn decide_change(
    is_delete: bool,
    remote: &Version,
    local: Option<&Version>,
    made_on_local: bool,
) -> Decision {
    let (missing, differs) = if is_delete {
        (
            ConflictKind::DeleteMissing,
            ConflictKind::DeleteOriginDiffers,
        )
    } else {
        (
            ConflictKind::UpdateMissing,
            ConflictKind::UpdateOriginDiffers,
        )
    };
    let Some(local) = local else {
        return Decision::SkipAndRecord(missing);
    };
    if local.origin == remote.origin || made_on_local {
        Decision::Apply
    } else if is_delete || remote_wins(remote, local) {
        Decision::ApplyAndRecord(differs)
    } else {
        Decision::SkipAndRecord(differs)
    }
}

/// An insert whose key exists here: the later version wins.
pub fn decide_insert_exists(remote: &Version, local: &Version) -> Decision {
    if remote_wins(remote, local) {
        Decision::ApplyAndRecord(ConflictKind::InsertExists)
    } else {
        Decision::SkipAndRecord(ConflictKind::InsertExists)
    }
}

/// A row image as JSON: column name to its text form (or null), as PostgreSQL prints it,
/// so that a recorded version can be written back through the same input functions.
/// Unchanged TOAST values are left out (the change did not carry them).
pub fn row_image(columns: &[String], values: &[Value]) -> Json {
    let mut m = Map::new();
    for (c, v) in columns.iter().zip(values) {
        match v {
            Value::Null => {
                m.insert(c.clone(), Json::Null);
            }
            Value::Text(b) => {
                m.insert(
                    c.clone(),
                    Json::String(String::from_utf8_lossy(b).into_owned()),
                );
            }
            Value::Binary(b) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                m.insert(c.clone(), Json::String(format!("\\x{hex}")));
            }
            Value::UnchangedToast => {}
        }
    }
    Json::Object(m)
}

/// Whether an old image (as sent) equals the local row (text forms, same column order).
/// Unchanged-TOAST entries of the old image are not compared.
pub fn old_image_matches(old: &Tuple, local: &[Option<String>]) -> bool {
    old.0.len() == local.len()
        && old.0.iter().zip(local).all(|(o, l)| match (o, l) {
            (Value::Null, None) => true,
            (Value::Text(b), Some(s)) => b.as_ref() == s.as_bytes(),
            (Value::UnchangedToast, _) => true,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn v(origin: &str, t: i64) -> Version {
        Version {
            origin: origin.into(),
            commit_time_us: Some(t),
        }
    }

    #[test]
    fn later_commit_wins_and_ties_go_to_the_greater_origin_name() {
        assert!(remote_wins(&v("walsync_a", 2), &v("walsync_b", 1)));
        assert!(!remote_wins(&v("walsync_a", 1), &v("walsync_b", 2)));
        assert!(remote_wins(&v("walsync_b", 5), &v("walsync_a", 5)));
        assert!(!remote_wins(&v("walsync_a", 5), &v("walsync_b", 5)));
        let unknown = Version {
            origin: "walsync_z".into(),
            commit_time_us: None,
        };
        assert!(remote_wins(&v("walsync_a", 0), &unknown));
    }

    #[test]
    fn both_nodes_of_a_concurrent_update_pick_the_same_winner() {
        let on_a = v("walsync_a", 10);
        let on_b = v("walsync_b", 20);
        // a receives b's update over its own version; b receives a's over its own.
        let at_a = decide_change(false, &on_b, Some(&on_a), false);
        let at_b = decide_change(false, &on_a, Some(&on_b), false);
        assert_eq!(
            at_a,
            Decision::ApplyAndRecord(ConflictKind::UpdateOriginDiffers)
        );
        assert_eq!(
            at_b,
            Decision::SkipAndRecord(ConflictKind::UpdateOriginDiffers)
        );
    }

    #[test]
    fn a_delete_wins_over_a_concurrent_update_on_both_nodes() {
        // a deleted at 10, b updated at 20: a gets the update for a row it no longer has,
        // b gets the delete for a row it changed. Both end without the row.
        let at_a = decide_change(false, &v("walsync_b", 20), None, false);
        let at_b = decide_change(true, &v("walsync_a", 10), Some(&v("walsync_b", 20)), false);
        assert_eq!(at_a, Decision::SkipAndRecord(ConflictKind::UpdateMissing));
        assert_eq!(
            at_b,
            Decision::ApplyAndRecord(ConflictKind::DeleteOriginDiffers)
        );
    }

    #[test]
    fn a_change_made_on_the_local_version_is_no_conflict() {
        assert_eq!(
            decide_change(false, &v("walsync_b", 1), Some(&v("walsync_a", 9)), true),
            Decision::Apply
        );
        assert_eq!(
            decide_change(true, &v("walsync_b", 1), Some(&v("walsync_b", 0)), false),
            Decision::Apply
        );
        assert_eq!(
            decide_change(true, &v("walsync_b", 1), None, false),
            Decision::SkipAndRecord(ConflictKind::DeleteMissing)
        );
    }

    #[test]
    fn images_are_text_and_old_images_compare_by_text() {
        let t = |s: &str| Value::Text(Bytes::copy_from_slice(s.as_bytes()));
        let cols = vec!["id".to_string(), "name".to_string(), "note".to_string()];
        let img = row_image(&cols, &[t("7"), Value::Null, Value::UnchangedToast]);
        assert_eq!(img.to_string(), r#"{"id":"7","name":null}"#);
        let old = Tuple(vec![t("7"), Value::Null, Value::UnchangedToast]);
        assert!(old_image_matches(
            &old,
            &[Some("7".into()), None, Some("x".into())]
        ));
        assert!(!old_image_matches(&old, &[Some("8".into()), None, None]));
        assert!(!old_image_matches(
            &old,
            &[Some("7".into()), Some("".into()), None]
        ));
    }
}
