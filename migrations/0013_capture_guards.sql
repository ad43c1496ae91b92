-- Schema walsync holds walsync's own objects only, and none of it is ever captured:
-- - a user statement that would create or alter an object in schema walsync is refused
--   (a role named walsync, whose default search_path "$user", public puts unqualified
--   names there, would otherwise create tables that are neither captured nor walsync's);
-- - a user statement that would drop one is refused (a captured DROP of walsync.x would
--   be replayed on every peer);
-- walsync's own changes (init, upgrades, the applier, the guard) run with
-- session_replication_role = replica, where the capture trigger does not fire; an
-- operator who must change schema walsync by hand does the same.

CREATE OR REPLACE FUNCTION walsync.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $walsync$
DECLARE
    q    text := pg_catalog.current_query();
    mark text := pg_catalog.md5(COALESCE(q, ''));
    prev text := pg_catalog.current_setting('walsync.ddl_statement', true);
    n    integer := 1;
    tags text;
    objs text[];
    own  text;
BEGIN
    SELECT c.object_identity INTO own FROM pg_catalog.pg_event_trigger_ddl_commands() c
     WHERE c.schema_name = 'walsync' LIMIT 1;
    IF own IS NOT NULL THEN
        RAISE EXCEPTION 'schema walsync holds walsync''s own objects: % was not created or changed there', own
          USING HINT = 'Create it in another schema (qualify the name, or SET search_path = public: a role named walsync '
                       'finds schema walsync first in the default search_path "$user", public). To change walsync''s '
                       'own objects by hand, SET session_replication_role = replica first.';
    END IF;
    -- Every DDL statement of the string counts, captured or not, so that positions
    -- match the statements the applier finds when it splits the string.
    IF prev IS NOT NULL AND pg_catalog.split_part(prev, ':', 1) = mark THEN
        n := pg_catalog.split_part(prev, ':', 2)::integer + 1;
    END IF;
    PERFORM pg_catalog.set_config('walsync.ddl_statement', mark || ':' || n, true);
    -- Temporary objects are node-local: not captured.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() c
                   WHERE c.schema_name IS NULL OR c.schema_name NOT LIKE 'pg\_temp%')
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

CREATE OR REPLACE FUNCTION walsync.note_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $walsync$
DECLARE
    own text;
BEGIN
    IF pg_catalog.current_setting('session_replication_role') <> 'replica' THEN
        SELECT d.object_identity INTO own FROM pg_catalog.pg_event_trigger_dropped_objects() d
         WHERE d.original AND (d.schema_name = 'walsync' OR (d.object_type = 'schema' AND d.object_name = 'walsync'))
         LIMIT 1;
        IF own IS NOT NULL THEN
            RAISE EXCEPTION 'schema walsync holds walsync''s own objects: % was not dropped', own
              USING HINT = 'To change walsync''s own objects by hand, SET session_replication_role = replica first.';
        END IF;
    END IF;
    INSERT INTO walsync.dropped_objects (object_type, schema_name, table_name, column_name)
    SELECT d.object_type, d.address_names[1], d.address_names[2],
           CASE WHEN d.object_type = 'table column' THEN d.address_names[3] END
      FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.original AND NOT d.is_temporary
       AND d.object_type IN ('table', 'table column')
       AND d.address_names[1] <> 'walsync';
END
$walsync$;
