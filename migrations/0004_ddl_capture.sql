-- DDL capture: every DDL statement run on this node (by anything but walsync's own
-- applier, which runs with session_replication_role = replica so event triggers stay
-- quiet) writes one row here, in the transaction that ran it. walsync.ddl_log is the one
-- walsync table that travels with the data: a peer's applier replays the statement at its
-- place in the stream.
--
-- What each row identifies: `query` is the whole client string (current_query()), which
-- may hold several statements, DML included; `statement_index` is the position of this
-- DDL statement among the DDL statements of that string (the n-th time the trigger fired
-- for it in this transaction). The applier splits the string with PostgreSQL's parser and
-- runs only that statement: DML travels in the WAL already.
--
-- No EXCEPTION blocks: a failure here fails the DDL, so nothing is applied uncaptured.

CREATE SEQUENCE walsync.ddl_log_seq;

CREATE TABLE walsync.ddl_log (
    origin           text    NOT NULL,
    seq              bigint  NOT NULL,
    statement_index  integer NOT NULL,
    query            text    NOT NULL,
    command_tag      text    NOT NULL,
    object_identities text[],
    search_path      text    NOT NULL,
    role             text    NOT NULL,
    captured_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, seq)
);
COMMENT ON TABLE walsync.ddl_log IS
  'DDL statements captured on any node, replicated with the data and replayed in place by the applier.';

-- SECURITY DEFINER: the application's role (e.g. odoo) may run DDL but has no rights on
-- schema walsync, and must not have them (a row here is replayed as DDL on every peer).
-- No SET search_path on the function, so that current_setting('search_path') is the
-- caller's; every name inside is schema-qualified instead. The role logged is the
-- session's login role (current_user is the definer in here).
CREATE FUNCTION walsync.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $walsync$
DECLARE
    q    text := pg_catalog.current_query();
    mark text := pg_catalog.md5(COALESCE(q, ''));
    prev text := pg_catalog.current_setting('walsync.ddl_statement', true);
    n    integer := 1;
    tags text;
    objs text[];
BEGIN
    -- Every DDL statement of the string counts, captured or not, so that positions
    -- match the statements the applier finds when it splits the string.
    IF prev IS NOT NULL AND pg_catalog.split_part(prev, ':', 1) = mark THEN
        n := pg_catalog.split_part(prev, ':', 2)::integer + 1;
    END IF;
    PERFORM pg_catalog.set_config('walsync.ddl_statement', mark || ':' || n, true);
    -- Temporary objects and walsync's own schema are node-local: not captured.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() c
                   WHERE c.schema_name IS NULL
                      OR (c.schema_name NOT LIKE 'pg\_temp%' AND c.schema_name <> 'walsync'))
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands()) THEN
        RETURN;
    END IF;
    SELECT pg_catalog.string_agg(DISTINCT c.command_tag, ', '), pg_catalog.array_agg(c.object_identity)
      INTO tags, objs
      FROM pg_catalog.pg_event_trigger_ddl_commands() c;
    INSERT INTO walsync.ddl_log (origin, seq, statement_index, query, command_tag,
                                 object_identities, search_path, role)
    VALUES ((SELECT w.name FROM walsync.node w), pg_catalog.nextval('walsync.ddl_log_seq'), n,
            COALESCE(q, ''), COALESCE(tags, tg_tag), objs,
            pg_catalog.current_setting('search_path'), session_user);
END
$walsync$;
REVOKE ALL ON FUNCTION walsync.capture_ddl() FROM PUBLIC;

CREATE EVENT TRIGGER walsync_ddl_capture ON ddl_command_end EXECUTE FUNCTION walsync.capture_ddl();
