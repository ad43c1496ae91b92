-- A DDL warning names the table and the columns each node filled with its own values.
-- While it is open, the applier leaves those columns out when it tells a sequential edit
-- from a conflict: the repair UPDATE on the author carries the author's values as its old
-- image, which differ here on purpose. `walsync ddl-replay --resolve-warning` closes it.
ALTER TABLE walsync.ddl_warnings
    ADD COLUMN table_schema text,
    ADD COLUMN table_name   text,
    ADD COLUMN columns      text[],
    ADD COLUMN resolved_at  timestamptz;
