-- Each score breakdown is stored once. History rows hold theirs; the current score names the history
-- row holding its breakdown in `history_at`, and keeps one in `signals` only when its breakdown has
-- changed since without a change of score or tier (history rows follow score and tier changes and
-- one a day, not every new number in an explanation). A first or daily rescore of 100,000 accounts
-- so writes each breakdown once instead of twice.
ALTER TABLE health_current ADD COLUMN history_at TIMESTAMPTZ;
ALTER TABLE health_current ALTER COLUMN signals DROP NOT NULL;
INSERT INTO health_scores (account_id, computed_at, score, tier, stale, model_version, signals)
SELECT account_id, computed_at, score, tier, stale, model_version, signals FROM health_current
ON CONFLICT (account_id, computed_at) DO UPDATE SET
    score = EXCLUDED.score, tier = EXCLUDED.tier, stale = EXCLUDED.stale,
    model_version = EXCLUDED.model_version, signals = EXCLUDED.signals;
UPDATE health_current SET history_at = computed_at, signals = NULL;

-- Each account's current score with its breakdown resolved: the one place that says where the
-- current breakdown is. Readers use this view rather than repeating the rule.
CREATE VIEW current_health_scores AS
SELECT h.account_id, h.computed_at, h.score, h.tier, h.stale, h.model_version, h.previous_score,
       h.score_change, coalesce(h.signals, hs.signals) AS signals
FROM health_current h
LEFT JOIN health_scores hs ON hs.account_id = h.account_id AND hs.computed_at = h.history_at;
