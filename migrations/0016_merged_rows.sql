-- One entity created on two nodes during a cut (a unique key of references and numbers:
-- res_users_settings (user_id); mail_followers with merge_unique) is merged, not renamed
-- or parked (decision 0008): the row with the smaller primary key stays, rows pointing at
-- the other are re-pointed at it, and the other goes, recorded whole with outcome 'merged'.
ALTER TABLE walsync.conflicts DROP CONSTRAINT conflicts_outcome_check;
ALTER TABLE walsync.conflicts ADD CONSTRAINT conflicts_outcome_check CHECK (outcome IN
  ('remote_applied', 'local_kept', 'skipped', 'columns_merged', 'local_renamed', 'remote_renamed',
   'parked', 'merged'));

-- Every merge this node decided or learnt of. It travels with the data, like
-- walsync.ddl_log: a node that learns of a merge re-points its own rows, and rows that
-- arrive later still naming the merged-away key are written with the key it merged into.
-- Keys are JSON arrays of the primary key's values as text, in key order.
CREATE TABLE walsync.merged_keys (
    table_schema text        NOT NULL,
    table_name   text        NOT NULL,
    loser_key    jsonb       NOT NULL,
    winner_key   jsonb       NOT NULL,
    decided_by   text        NOT NULL,
    decided_at   timestamptz NOT NULL DEFAULT now(),
    -- When this node learnt of it (set here, not copied from the node that decided):
    -- the guard re-points late rows for recent merges (docs/conflicts.md).
    learnt_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name, loser_key)
);
COMMENT ON TABLE walsync.merged_keys IS
  'Rows merged into another row with the same unique key (decision 0008); replicated with the data.';
