-- Source transactions set aside on this node: they change a table that is not here
-- (its DDL refused by ddl_from, failed, or still on its way from another node), or a
-- table an earlier set-aside transaction of the link changes (order per table). Each is
-- kept whole (its pgoutput messages, the Relation messages it needs first) and applied
-- again, in order, once its tables are here; the link goes on meanwhile.
CREATE TABLE walsync.set_aside (
    link          text NOT NULL,
    end_lsn       pg_lsn NOT NULL,
    origin        text NOT NULL,
    origin_lsn    pg_lsn NOT NULL,
    commit_time   timestamptz NOT NULL,
    set_aside_at  timestamptz NOT NULL DEFAULT now(),
    waits_for     text NOT NULL,
    tables        text[] NOT NULL,
    changes       integer NOT NULL,
    messages      bytea[] NOT NULL,
    PRIMARY KEY (link, end_lsn)
);
COMMENT ON TABLE walsync.set_aside IS
  'Source transactions kept whole until their tables are here (waits_for), applied again in order by the link.';
