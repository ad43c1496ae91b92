-- Tombstones (decision 0016): the key of every row deleted here, by the application or
-- by a peer's applied delete, and the transaction that deleted it. The delete's commit
-- time and origin are read back from that transaction when a later change needs them
-- (pg_xact_commit_timestamp_origin): for an applied delete they are its author's (the
-- applier sets both), so every node compares the same numbers. An update that arrives
-- for a row deleted here is decided by them against the delete: a later update brings
-- the row back. Kept per node, never replicated (merge::replicates_relation); the guard
-- forgets those older than [cluster] tombstone_days.
CREATE TABLE walsync.tombstones (
    table_name text NOT NULL,
    key        text[] NOT NULL,
    xid        xid8 NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, key)
);
CREATE INDEX tombstones_deleted_at ON walsync.tombstones (deleted_at);
COMMENT ON TABLE walsync.tombstones IS
  'Keys of rows deleted here (schema.table, primary key values as text) and the deleting transaction.';

-- The row trigger: the primary key read from the catalog at each delete (a key changed
-- by a later ALTER is followed), the values as to_jsonb writes them as text (what the
-- applier compares them with; a key of a type whose JSON text is not its text form,
-- a boolean or a timestamp, is then simply not found, and the change is decided as
-- before tombstones).
CREATE FUNCTION walsync.keep_tombstone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $walsync$
DECLARE
    k text[];
    r jsonb := pg_catalog.to_jsonb(OLD);
BEGIN
    SELECT pg_catalog.array_agg(r ->> a.attname::text ORDER BY p.ord) INTO k
      FROM pg_catalog.pg_index i
     CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY p(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = p.attnum
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    IF k IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO walsync.tombstones (table_name, key, xid)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, k, pg_catalog.pg_current_xact_id())
    ON CONFLICT (table_name, key) DO UPDATE SET xid = EXCLUDED.xid, deleted_at = pg_catalog.now();
    RETURN NULL;
END
$walsync$;
REVOKE ALL ON FUNCTION walsync.keep_tombstone() FROM PUBLIC;

-- The trigger on one table, ENABLE ALWAYS (it fires for applied deletes too), made in
-- replica mode so that the capture does not send it to the peers (each node makes its
-- own). Returns whether it was made.
CREATE FUNCTION walsync.keep_tombstones_of(tbl regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $walsync$
DECLARE
    role text := pg_catalog.current_setting('session_replication_role');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                WHERE t.tgrelid = tbl AND t.tgname = 'walsync_tombstone') THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.set_config('session_replication_role', 'replica', true);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER walsync_tombstone AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION walsync.keep_tombstone()',
        tbl);
    EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER walsync_tombstone', tbl);
    PERFORM pg_catalog.set_config('session_replication_role', role, true);
    RETURN true;
END
$walsync$;
REVOKE ALL ON FUNCTION walsync.keep_tombstones_of(regclass) FROM PUBLIC;

-- Every replicated table that lacks the trigger (init, and the guard every pass: one
-- catalog query when all have it): how many got it now.
CREATE FUNCTION walsync.keep_tombstones_everywhere() RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $walsync$
    SELECT pg_catalog.count(*) FILTER (WHERE walsync.keep_tombstones_of(c.oid))::integer
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'r' AND c.relpersistence = 'p'
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walsync')
       AND n.nspname NOT LIKE 'pg\_%'
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                        WHERE t.tgrelid = c.oid AND t.tgname = 'walsync_tombstone')
$walsync$;
REVOKE ALL ON FUNCTION walsync.keep_tombstones_everywhere() FROM PUBLIC;

-- A table created from now on has it from the statement that creates it.
CREATE FUNCTION walsync.tombstones_of_new_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $walsync$
DECLARE
    tbl oid;
BEGIN
    FOR tbl IN SELECT DISTINCT c.objid FROM pg_catalog.pg_event_trigger_ddl_commands() c
               JOIN pg_catalog.pg_class r ON r.oid = c.objid
               WHERE c.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
                 AND c.object_type = 'table' AND c.schema_name <> 'walsync'
                 AND r.relkind = 'r' AND r.relpersistence = 'p'
    LOOP
        PERFORM walsync.keep_tombstones_of(tbl::regclass);
    END LOOP;
END
$walsync$;
REVOKE ALL ON FUNCTION walsync.tombstones_of_new_tables() FROM PUBLIC;

CREATE EVENT TRIGGER walsync_tombstones_of_new_tables ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
  EXECUTE FUNCTION walsync.tombstones_of_new_tables();
ALTER EVENT TRIGGER walsync_tombstones_of_new_tables ENABLE ALWAYS;
