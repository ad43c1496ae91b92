-- CREATE TABLE ... AS and SELECT ... INTO are captured as the CREATE TABLE of the table
-- they made, its columns read from the catalog in the capturing transaction: a peer
-- never re-runs the query (it would fill the table with its own rows, or fail on a
-- table or column it does not have). The rows the query wrote reach the peers as data;
-- they come before this record in the stream, and the applier keeps them until the
-- table exists (src/apply/inserts.rs). Everything else is captured as in 0013.

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
    made text;
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
    -- A table made from a query travels as its structure: the peers get the columns
    -- read from the catalog now, never a re-run of the query (their rows differ), and
    -- the rows follow as data (they were decoded before this record: the applier keeps
    -- them until the table is there).
    IF tg_tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
        SELECT pg_catalog.format('CREATE %sTABLE %I.%I (%s)',
                                 CASE r.relpersistence WHEN 'u' THEN 'UNLOGGED ' ELSE '' END,
                                 ns.nspname, r.relname,
                                 pg_catalog.string_agg(pg_catalog.format('%I %s%s%s', a.attname,
                                     pg_catalog.format_type(a.atttypid, a.atttypmod),
                                     CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
                                          THEN ' COLLATE ' || a.attcollation::pg_catalog.regcollation::text ELSE '' END,
                                     CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END),
                                   ', ' ORDER BY a.attnum))
          INTO made
          FROM pg_catalog.pg_event_trigger_ddl_commands() c
          JOIN pg_catalog.pg_class r ON r.oid = c.objid AND r.relkind = 'r'
          JOIN pg_catalog.pg_namespace ns ON ns.oid = r.relnamespace
          JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
          JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
         WHERE c.object_type = 'table'
         GROUP BY r.oid, r.relpersistence, ns.nspname, r.relname
         LIMIT 1;
    END IF;
    INSERT INTO walsync.ddl_log (origin, seq, statement_index, query, command_tag,
                                 object_identities, search_path, role)
    VALUES ((SELECT w.name FROM walsync.node w), pg_catalog.nextval('walsync.ddl_log_seq'),
            CASE WHEN made IS NULL THEN n ELSE 1 END,
            COALESCE(made, q, ''), COALESCE(tags, tg_tag), objs,
            pg_catalog.current_setting('search_path'), session_user);
END
$walsync$;
