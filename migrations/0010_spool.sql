-- Spooled change streams (docs/decisions/0006): while a peer is away, the sidecar next to
-- its slot streams the slot into segments here and acknowledges it, so the WAL is
-- released. Each segment holds whole transactions, in stream order, as a large object
-- (pg_largeobject is a catalog: written durably with WAL, never published to peers).
CREATE TABLE walsync.spool_segments (
    slot text NOT NULL,
    -- End LSN (on this node) of the last transaction in the segment; segments of a slot
    -- follow each other in this order.
    end_lsn pg_lsn NOT NULL,
    -- Commit LSN of the first transaction in it.
    start_lsn pg_lsn NOT NULL,
    data oid NOT NULL,
    bytes bigint NOT NULL,
    transactions integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, end_lsn)
);

-- A returning link replays the spool before it streams: a state of its own.
ALTER TABLE walsync.link_status DROP CONSTRAINT link_status_state_check,
    ADD CONSTRAINT link_status_state_check
    CHECK (state IN ('streaming', 'retrying', 'stopped', 'replaying'));
