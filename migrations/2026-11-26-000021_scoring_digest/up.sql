-- A digest of each current score's signals lets a rescore that finds nothing new only move
-- computed_at instead of resending and rewriting the whole breakdown. A low toast_tuple_target keeps
-- the breakdown out of line and a fillfactor leaves room on each page, so those updates are HOT
-- updates of small tuples (no index churn), and score-ordered list scans read small tuples too.
ALTER TABLE health_current ADD COLUMN signals_digest BIGINT;
ALTER TABLE health_current SET (toast_tuple_target = 128, fillfactor = 50);
