-- Every conflict a node decided, with both versions: nothing is thrown away silently.
-- Images are jsonb objects of column name -> text form (as PostgreSQL prints it) or null.

CREATE TABLE walsync.conflicts (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    detected_at        timestamptz NOT NULL DEFAULT now(),
    link               text NOT NULL,
    kind               text NOT NULL,
    table_schema       text NOT NULL,
    table_name         text NOT NULL,
    key                jsonb NOT NULL,
    local_row          jsonb,
    local_origin       text,
    local_commit_time  timestamptz,
    remote_row         jsonb,
    remote_origin      text NOT NULL,
    remote_commit_time timestamptz NOT NULL,
    rule               text NOT NULL,
    outcome            text NOT NULL CHECK (outcome IN ('remote_applied', 'local_kept', 'skipped')),
    reapplied_at       timestamptz
);
CREATE INDEX conflicts_table_idx ON walsync.conflicts (table_schema, table_name, detected_at);
COMMENT ON TABLE walsync.conflicts IS
  'Conflicts decided on this node: both versions, both origins and commit times, the rule and the outcome.';
