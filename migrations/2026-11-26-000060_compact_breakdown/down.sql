UPDATE score_changes sc SET drivers = coalesce(healthd_breakdown_drivers(hs.signals), '[]'::json)
FROM health_scores hs
WHERE sc.drivers IS NULL AND hs.account_id = sc.account_id AND hs.computed_at = sc.changed_at;
UPDATE score_changes SET drivers = '[]'::json WHERE drivers IS NULL;
ALTER TABLE score_changes ALTER COLUMN drivers SET NOT NULL;
CREATE OR REPLACE FUNCTION healthd_score_changes_published() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last_id BIGINT;
BEGIN
    SELECT max(id) INTO last_id FROM new_rows;
    IF last_id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (webhook_id, event_type, event_id, payload)
    SELECT w.id, 'score.changed', n.id,
           jsonb_build_object(
               'event', 'score.changed',
               'id', n.id::text,
               'account', jsonb_build_object('id', a.id::text, 'key', a.key, 'name', a.name, 'owner', a.owner),
               'previousScore', n.previous_score,
               'score', n.score,
               'previousTier', upper(n.previous_tier),
               'tier', upper(n.tier),
               'drivers', n.drivers,
               'changedAt', n.changed_at)
    FROM new_rows n
    JOIN accounts a ON a.id = n.account_id
    JOIN webhooks w ON w.enabled AND 'score.changed' = ANY (w.events)
    WHERE (jsonb_typeof(w.filter -> 'accountKeys') IS DISTINCT FROM 'array' OR w.filter -> 'accountKeys' ? a.key)
      AND (jsonb_typeof(w.filter -> 'tiers') IS DISTINCT FROM 'array' OR w.filter -> 'tiers' ? upper(n.tier))
      AND (jsonb_typeof(w.filter -> 'minDrop') IS DISTINCT FROM 'number'
           OR coalesce(n.previous_score - n.score, 0) >= (w.filter ->> 'minDrop')::float8)
    ON CONFLICT (webhook_id, event_type, event_id) DO NOTHING;
    PERFORM pg_notify('healthd_events', json_build_object('kind', 'score_change', 'id', last_id)::text);
    RETURN NULL;
END $$;
DROP FUNCTION healthd_breakdown_drivers(json);
DROP TRIGGER accounts_deleted ON accounts;
DROP FUNCTION healthd_accounts_deleted();
DELETE FROM health_current hc WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = hc.account_id);
ALTER TABLE health_current ADD CONSTRAINT health_current_account_id_fkey
    FOREIGN KEY (account_id) REFERENCES accounts (id) ON DELETE CASCADE;
ALTER TABLE health_current ALTER COLUMN signals TYPE jsonb USING signals::jsonb;
ALTER TABLE health_scores ALTER COLUMN signals TYPE jsonb USING signals::jsonb;
ALTER TABLE score_changes ALTER COLUMN drivers TYPE jsonb USING drivers::jsonb;
