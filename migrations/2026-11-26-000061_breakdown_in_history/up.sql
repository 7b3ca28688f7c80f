-- Each score breakdown is stored once, in its history row. The current score names that row in
-- `history_at` (the latest history row always holds the current breakdown: a rescore writes one
-- whenever the breakdown changes, and the daily one copies it), so health_current is a narrow table:
-- a first or daily rescore of 100,000 accounts no longer writes every breakdown twice, and
-- score-ordered list scans read small rows.
ALTER TABLE health_current ADD COLUMN history_at TIMESTAMPTZ;
INSERT INTO health_scores (account_id, computed_at, score, tier, stale, model_version, signals)
SELECT account_id, computed_at, score, tier, stale, model_version, signals FROM health_current
ON CONFLICT (account_id, computed_at) DO UPDATE SET
    score = EXCLUDED.score, tier = EXCLUDED.tier, stale = EXCLUDED.stale,
    model_version = EXCLUDED.model_version, signals = EXCLUDED.signals;
UPDATE health_current SET history_at = computed_at;
ALTER TABLE health_current DROP COLUMN signals;
ALTER TABLE health_current RESET (toast_tuple_target);
