-- Nodes removed from the cluster (walsync remove-node), recorded on every node the
-- command reached: their links are refused by name at both ends and a removed node's
-- sidecar exits instead of resuming. A fresh walsync join of that node clears it.
CREATE TABLE walsync.removed_nodes (
    name       text PRIMARY KEY,
    removed_at timestamptz NOT NULL DEFAULT now(),
    removed_on text NOT NULL
);
COMMENT ON TABLE walsync.removed_nodes IS
  'Nodes removed with walsync remove-node: their links are refused until a fresh walsync join.';
