-- A row that collides on a unique key no rule settles is parked: not written on the
-- node that decided so, its whole image recorded, the link going on (docs/conflicts.md).
ALTER TABLE walsync.conflicts DROP CONSTRAINT conflicts_outcome_check;
ALTER TABLE walsync.conflicts ADD CONSTRAINT conflicts_outcome_check CHECK (outcome IN
  ('remote_applied', 'local_kept', 'skipped', 'columns_merged', 'local_renamed', 'remote_renamed',
   'parked'));
