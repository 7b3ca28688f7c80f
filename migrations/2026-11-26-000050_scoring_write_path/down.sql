ALTER TABLE health_current ALTER COLUMN signals SET COMPRESSION default;
ALTER TABLE health_scores ALTER COLUMN signals SET COMPRESSION default;
ALTER TABLE score_changes ALTER COLUMN drivers SET COMPRESSION default;
