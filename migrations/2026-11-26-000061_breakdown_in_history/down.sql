DROP VIEW current_health_scores;
UPDATE health_current h SET signals = hs.signals
FROM health_scores hs
WHERE h.signals IS NULL AND hs.account_id = h.account_id AND hs.computed_at = h.history_at;
UPDATE health_current SET signals = '[]'::json WHERE signals IS NULL;
ALTER TABLE health_current ALTER COLUMN signals SET NOT NULL;
ALTER TABLE health_current DROP COLUMN history_at;
