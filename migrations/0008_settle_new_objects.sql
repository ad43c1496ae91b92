-- What walsync init sets up holds for new objects from the statement that creates them,
-- in its transaction: a sequence is partitioned for this node the moment it is created
-- or altered (a serial column in a module install, a sequence Odoo creates inside a
-- business transaction, ALTER SEQUENCE ... RESTART / INCREMENT BY), so not even its
-- first value can collide with another node's; a new table gets REPLICA IDENTITY FULL
-- before its first update. The sidecar's guard still catches what DDL does not show
-- (setval) and objects created before this migration.
--
-- ENABLE ALWAYS: it also fires under session_replication_role = replica, i.e. for DDL a
-- peer's applier replays here. Its own ALTERs run in replica mode, so the capture
-- trigger (which fires in origin mode only) does not send them to the peers (each node
-- makes its own); firing again for them, it finds everything in order and stops.

CREATE FUNCTION walsync.settle_new_objects() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $walsync$
DECLARE
    me    record;
    seq   oid;
    inc   bigint;
    top   bigint;
    last  bigint;
    called boolean;
    nxt   bigint;
    class bigint;
    tbl   oid;
    role  text := pg_catalog.current_setting('session_replication_role');
BEGIN
    SELECT w.id, w.step INTO me FROM walsync.node w;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    class := me.id % me.step;
    FOR seq IN SELECT DISTINCT c.objid FROM pg_catalog.pg_event_trigger_ddl_commands() c
               WHERE c.object_type = 'sequence' AND c.schema_name <> 'walsync'
                 AND c.schema_name NOT LIKE 'pg\_temp%'
    LOOP
        SELECT s.seqincrement, s.seqmax INTO inc, top FROM pg_catalog.pg_sequence s
         WHERE s.seqrelid = seq;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        EXECUTE pg_catalog.format('SELECT last_value, is_called FROM %s', seq::regclass)
           INTO last, called;
        nxt := CASE WHEN called THEN last + inc ELSE last END;
        IF inc = me.step AND pg_catalog.mod(pg_catalog.mod(nxt, me.step) + me.step, me.step) = class THEN
            CONTINUE;
        END IF;
        -- The smallest value from nxt on in this node's class (sequences::next_partitioned).
        nxt := nxt + pg_catalog.mod(pg_catalog.mod(class - nxt, me.step) + me.step, me.step);
        PERFORM pg_catalog.set_config('session_replication_role', 'replica', true);
        EXECUTE pg_catalog.format('ALTER SEQUENCE %s INCREMENT BY %s MINVALUE 1 MAXVALUE %s RESTART WITH %s',
                                  seq::regclass, me.step, top, nxt);
        PERFORM pg_catalog.set_config('session_replication_role', role, true);
    END LOOP;
    FOR tbl IN SELECT DISTINCT c.objid FROM pg_catalog.pg_event_trigger_ddl_commands() c
               JOIN pg_catalog.pg_class r ON r.oid = c.objid
               WHERE c.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
                 AND c.object_type = 'table' AND c.schema_name <> 'walsync'
                 AND r.relkind = 'r' AND r.relpersistence = 'p' AND r.relreplident <> 'f'
    LOOP
        PERFORM pg_catalog.set_config('session_replication_role', 'replica', true);
        EXECUTE pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl::regclass);
        PERFORM pg_catalog.set_config('session_replication_role', role, true);
    END LOOP;
END
$walsync$;
REVOKE ALL ON FUNCTION walsync.settle_new_objects() FROM PUBLIC;

CREATE EVENT TRIGGER walsync_settle_new_objects ON ddl_command_end
  WHEN TAG IN ('CREATE SEQUENCE', 'ALTER SEQUENCE', 'CREATE TABLE', 'CREATE TABLE AS',
               'SELECT INTO', 'ALTER TABLE', 'CREATE SCHEMA')
  EXECUTE FUNCTION walsync.settle_new_objects();
ALTER EVENT TRIGGER walsync_settle_new_objects ENABLE ALWAYS;
