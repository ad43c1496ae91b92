-- A schema change a node's ddl_from refused (a store's DDL, recorded on main) can be
-- accepted by a person there: `walsync ddl-replay --accept ORIGIN/SEQ` runs it on that
-- node and writes a row of its own that names the accepted one here, so that it
-- replicates onward under the accepting node's authority. The author skips it (it ran
-- there); every other node runs it and closes its own record of the refusal.
ALTER TABLE walsync.ddl_log ADD COLUMN accepts text;
COMMENT ON COLUMN walsync.ddl_log.accepts IS
  'ORIGIN/SEQ of the refused statement this row accepts (walsync ddl-replay --accept); NULL for a captured one.';
