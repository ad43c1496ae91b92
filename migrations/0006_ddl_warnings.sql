-- DDL this node replayed that leaves its rows different from the author's: a column
-- added with values computed on each node (a volatile default, a serial type).
-- `walsync status` lists them; the fix is an UPDATE on the author (it replicates as data).

CREATE TABLE walsync.ddl_warnings (
    origin      text   NOT NULL,
    seq         bigint NOT NULL,
    statement   text   NOT NULL,
    warning     text   NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, seq)
);
