-- Captured DDL an operator told this node to skip (`walsync ddl-replay --skip`), after
-- fixing things by hand: the applier then records the statement without running it.

CREATE TABLE walsync.ddl_skip (
    origin     text   NOT NULL,
    seq        bigint NOT NULL,
    skipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, seq)
);
