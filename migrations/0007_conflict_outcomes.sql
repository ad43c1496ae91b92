-- Outcomes of column-level merge and unique-key collisions, and what a rename wrote.
ALTER TABLE walsync.conflicts DROP CONSTRAINT conflicts_outcome_check;
ALTER TABLE walsync.conflicts ADD CONSTRAINT conflicts_outcome_check CHECK (outcome IN
  ('remote_applied', 'local_kept', 'skipped', 'columns_merged', 'local_renamed', 'remote_renamed'));
ALTER TABLE walsync.conflicts ADD COLUMN detail text;
COMMENT ON COLUMN walsync.conflicts.detail IS
  'For a unique-key collision: the key and the value the losing row was renamed to.';
