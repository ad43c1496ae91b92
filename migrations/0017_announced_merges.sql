-- A merge is noted in the transaction that decided it, under that transaction's author:
-- the note goes where that transaction goes, which may miss a node (the loser's own
-- author, in a star; every peer, in a mesh). The deciding node's guard then announces
-- each of its notes once, as a write of its own (announced = true), which reaches every
-- node; an applier learns a merge from that update as from the insert (decision 0008).
ALTER TABLE walsync.merged_keys ADD COLUMN announced boolean NOT NULL DEFAULT false;
