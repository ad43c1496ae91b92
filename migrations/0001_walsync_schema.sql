-- walsync's own schema: identity of this node, the link progress that makes apply
-- exactly-once, and the bookkeeping later migrations add. Never forwarded to peers
-- (the applier drops every relation of schema walsync except walsync.ddl_log).

CREATE TABLE walsync.node (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    name       text    NOT NULL,
    id         integer NOT NULL,
    step       integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE walsync.node IS 'Which cluster node this database is; set once by walsync init.';

CREATE TABLE walsync.link_progress (
    link               text   PRIMARY KEY,
    source_lsn         pg_lsn NOT NULL,
    source_commit_time timestamptz,
    transactions       bigint NOT NULL DEFAULT 0,
    applied_at         timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE walsync.link_progress IS
  'Per incoming link: end LSN (on the upstream) of the last source transaction applied here, written in the same transaction as its rows.';
