-- Status from facts that age out (docs/operations.md, "Link states"):
-- each link's runner stamps heartbeat_at every few seconds, so a link whose sidecar
-- stopped or died shows `down` whoever asks; `down` is also written on a clean stop.
ALTER TABLE walsync.link_status ADD COLUMN heartbeat_at timestamptz;
ALTER TABLE walsync.link_status DROP CONSTRAINT link_status_state_check,
    ADD CONSTRAINT link_status_state_check
    CHECK (state IN ('streaming', 'retrying', 'stopped', 'replaying', 'down'));

-- Since when each slot of this node has had no reader, as the sidecar's guard saw it
-- (PostgreSQL 15 does not keep it). NULL: the slot was active when last seen.
CREATE TABLE walsync.slot_activity (
    slot           text PRIMARY KEY,
    inactive_since timestamptz
);
