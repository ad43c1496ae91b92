//! Fencing removed nodes: `walsync remove-node` records the removal on every node it
//! reaches (`walsync.removed_nodes`, migration 0014); a link whose either end is recorded
//! there is refused at both ends, and a removed node's sidecar exits instead of resuming.
//! A fresh `walsync join` of the node clears the record.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::NodeRef;
use crate::node::connect::connect;

/// A node recorded as removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub node: String,
    pub removed_at: String,
    /// The node whose `remove-node` recorded it.
    pub removed_on: String,
}

impl std::fmt::Display for Removal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} was removed from the cluster (walsync remove-node, run on {} at {}); its links are refused. \
             To bring it back, recreate its database empty and run walsync join with its config (docs/operations.md, \
             \"Bringing a removed node back\")",
            self.node, self.removed_on, self.removed_at
        )
    }
}

/// The first of `names` recorded as removed on the node `client` is connected to. A node
/// whose schema predates the record has none.
pub async fn removed(
    client: &Client,
    names: &[&str],
) -> Result<Option<Removal>, tokio_postgres::Error> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let row = client
        .query_opt(
            "SELECT r.name, r.removed_at::text, r.removed_on FROM walsync.removed_nodes r \
             WHERE r.name = ANY($1) LIMIT 1",
            &[&names],
        )
        .await;
    let row = match row {
        Ok(r) => r,
        // 42P01: no such table (a schema older than migration 0014).
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e),
    };
    Ok(row.map(|r| Removal {
        node: r.get(0),
        removed_at: r.get(1),
        removed_on: r.get(2),
    }))
}

/// The removal of `node` as recorded on any of `peers`, asked all at once (as
/// `application`); a peer that cannot answer within `timeout` is passed over.
pub async fn removal_seen_by(
    peers: &[NodeRef],
    node: &str,
    application: &str,
    timeout: Duration,
) -> Option<Removal> {
    let asks = peers.iter().map(|peer| async move {
        let ask = async {
            let client = connect(&peer.dsn, application).await.ok()?;
            removed(&client, &[node]).await.ok()?
        };
        tokio::time::timeout(timeout, ask).await.ok().flatten()
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .next()
}

/// Records `node` as removed by a command run on `removed_on`.
pub async fn record_removal(
    client: &Client,
    node: &str,
    removed_on: &str,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO walsync.removed_nodes (name, removed_on) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET removed_at = now(), removed_on = excluded.removed_on",
            &[&node, &removed_on],
        )
        .await
}

/// Clears the record of `node` (a fresh join brings it back). Returns whether there was one.
pub async fn clear_removal(client: &Client, node: &str) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            "DELETE FROM walsync.removed_nodes WHERE name = $1",
            &[&node],
        )
        .await;
    match n {
        Ok(n) => Ok(n > 0),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(false),
        Err(e) => Err(e),
    }
}
