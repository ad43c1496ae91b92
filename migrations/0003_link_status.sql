-- What each link into this node is doing, written by the sidecar that runs it: for
-- `walsync status`. Best effort: a link that cannot reach this node cannot report here.

CREATE TABLE walsync.link_status (
    link            text PRIMARY KEY,
    state           text NOT NULL CHECK (state IN ('streaming', 'retrying', 'stopped')),
    detail          text,
    clock_offset_ms double precision,
    since           timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE walsync.link_status IS
  'Per incoming link: streaming, retrying (transient error) or stopped (needs an operator), the last error, and the upstream clock offset.';
