-- Tables and columns dropped on this node (by a local statement or by DDL replayed from
-- a peer). A peer that was cut off may still send rows for them: the applier finds the
-- drop here, records those rows in walsync.conflicts instead of stopping the link on a
-- "missing" table, and applies the rest. Node-local, like everything in schema walsync
-- but ddl_log.
--
-- ENABLE ALWAYS: replayed drops (session_replication_role = replica) count too.

CREATE TABLE walsync.dropped_objects (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    object_type text NOT NULL CHECK (object_type IN ('table', 'table column')),
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    column_name text,
    dropped_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dropped_objects_name_idx ON walsync.dropped_objects (schema_name, table_name);
COMMENT ON TABLE walsync.dropped_objects IS
  'Tables and columns dropped on this node: rows a peer still sends for them are recorded, not applied.';

CREATE FUNCTION walsync.note_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $walsync$
BEGIN
    INSERT INTO walsync.dropped_objects (object_type, schema_name, table_name, column_name)
    SELECT d.object_type, d.address_names[1], d.address_names[2],
           CASE WHEN d.object_type = 'table column' THEN d.address_names[3] END
      FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.original AND NOT d.is_temporary
       AND d.object_type IN ('table', 'table column')
       AND d.address_names[1] <> 'walsync';
END
$walsync$;
REVOKE ALL ON FUNCTION walsync.note_dropped() FROM PUBLIC;

CREATE EVENT TRIGGER walsync_note_dropped ON sql_drop EXECUTE FUNCTION walsync.note_dropped();
ALTER EVENT TRIGGER walsync_note_dropped ENABLE ALWAYS;
