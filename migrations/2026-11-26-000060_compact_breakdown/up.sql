-- Score breakdowns are written in bulk (one per changed account per rescore, 100,000 at once on a
-- first or daily run) and only read a page at a time, so they are stored as `json` (validated text)
-- rather than `jsonb`: the write no longer builds a binary tree nobody queries by path. New rows also
-- drop the keys that follow from `key` (see server/src/scoring/breakdown.rs); old rows keep theirs.
-- This rewrites the three tables once.
ALTER TABLE health_current ALTER COLUMN signals TYPE json USING signals::json;
ALTER TABLE health_scores ALTER COLUMN signals TYPE json USING signals::json;
ALTER TABLE score_changes ALTER COLUMN drivers TYPE json USING drivers::json;
-- Changing a column's type resets its compression method: set lz4 again (as in 000050).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE health_current ALTER COLUMN signals SET COMPRESSION lz4;
        ALTER TABLE health_scores ALTER COLUMN signals SET COMPRESSION lz4;
        ALTER TABLE score_changes ALTER COLUMN drivers SET COMPRESSION lz4;
    END IF;
END
$$;

-- The foreign key to accounts cost a row-level check per inserted current score (about 0.65 s per
-- 100,000 first scores, a third of the write). Instead: the rescore writes only accounts that exist
-- when it writes, deleting accounts deletes their current scores (one statement-level trigger, in
-- the deleting transaction, whoever deletes), and every full rescore removes current scores left by
-- an account deleted while it ran. health_scores and score_changes never had the key (history
-- outlives accounts).
ALTER TABLE health_current DROP CONSTRAINT IF EXISTS health_current_account_id_fkey;
CREATE FUNCTION healthd_accounts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM health_current h USING gone g WHERE h.account_id = g.id;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_deleted AFTER DELETE ON accounts
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION healthd_accounts_deleted();

-- A score change's drivers are the entries of the history row written with it (same account, same
-- moment) that cost points, so new feed rows leave `drivers` NULL and readers derive them from that
-- row: a first rescore of 100,000 accounts no longer writes every breakdown a third time. Rows
-- written earlier keep their stored drivers, and readers prefer them.
ALTER TABLE score_changes ALTER COLUMN drivers DROP NOT NULL;

-- The drivers of a stored breakdown, in the read rule's order: stale-data entries first, then the
-- entries that cost points, largest impact first.
CREATE FUNCTION healthd_breakdown_drivers(signals json) RETURNS json LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(json_agg(e ORDER BY coalesce((e ->> 'stale')::bool, false) DESC,
                                        (e ->> 'impact')::float8 DESC), '[]'::json)
    FROM json_array_elements(CASE WHEN json_typeof(signals) = 'array' THEN signals ELSE '[]'::json END) AS x(e)
    WHERE coalesce((e ->> 'stale')::bool, false)
       OR (json_typeof(e -> 'impact') = 'number' AND (e ->> 'impact')::float8 > 0)
$$;

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
               'drivers', coalesce(n.drivers, healthd_breakdown_drivers(hs.signals), '[]'::json),
               'changedAt', n.changed_at)
    FROM new_rows n
    JOIN accounts a ON a.id = n.account_id
    JOIN webhooks w ON w.enabled AND 'score.changed' = ANY (w.events)
    LEFT JOIN health_scores hs ON hs.account_id = n.account_id AND hs.computed_at = n.changed_at
    WHERE (jsonb_typeof(w.filter -> 'accountKeys') IS DISTINCT FROM 'array' OR w.filter -> 'accountKeys' ? a.key)
      AND (jsonb_typeof(w.filter -> 'tiers') IS DISTINCT FROM 'array' OR w.filter -> 'tiers' ? upper(n.tier))
      AND (jsonb_typeof(w.filter -> 'minDrop') IS DISTINCT FROM 'number'
           OR coalesce(n.previous_score - n.score, 0) >= (w.filter ->> 'minDrop')::float8)
    ON CONFLICT (webhook_id, event_type, event_id) DO NOTHING;
    PERFORM pg_notify('healthd_events', json_build_object('kind', 'score_change', 'id', last_id)::text);
    RETURN NULL;
END $$;
