-- Alerts, the change feed and webhooks.
--
-- Feed ordering: subscribers and webhook outboxes read score_changes and alerts by id since the
-- last one seen. That only loses nothing if a row with a lower id can never become visible after
-- a higher one, so writers of each feed table take a transaction-scoped advisory lock before
-- their ids are drawn (a BEFORE STATEMENT trigger): ids then commit in order. The lock is held
-- only from the feed insert to commit, which writers do last in their transaction.

ALTER TABLE alerts
    ADD COLUMN owner        TEXT,
    ADD COLUMN feedback_by  TEXT,
    ADD COLUMN feedback_at  TIMESTAMPTZ,
    -- Rule measurements when raised (peak score, tier left...), for auto-resolution with hysteresis.
    ADD COLUMN details      JSONB NOT NULL DEFAULT '{}',
    -- `auto` when the condition cleared by its margin, else the token name that resolved it.
    ADD COLUMN resolved_by  TEXT;

-- Cool-down look-ups: the latest resolution per (account, rule).
CREATE INDEX alerts_cooldown_idx ON alerts (account_id, rule, resolved_at DESC) WHERE status = 'resolved';
-- Wake-up of snoozed alerts.
CREATE INDEX alerts_snoozed_idx ON alerts (snoozed_until) WHERE status = 'snoozed';
-- Precision per rule from feedback.
CREATE INDEX alerts_feedback_idx ON alerts (rule, feedback) WHERE feedback IS NOT NULL;

-- Every attempt to deliver a webhook, for the per-receiver delivery log.
CREATE TABLE webhook_delivery_attempts (
    delivery_id      BIGINT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt          INTEGER NOT NULL,
    attempted_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    response_status  INTEGER,
    error            TEXT,
    duration_ms      INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE INDEX webhook_deliveries_webhook_idx ON webhook_deliveries (webhook_id, id DESC);

-- Serialises feed writers so ids commit in order (see above).
CREATE FUNCTION healthd_feed_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(CASE TG_TABLE_NAME WHEN 'score_changes' THEN 7368500041 ELSE 7368500042 END);
    RETURN NULL;
END $$;

-- New score changes: outbox rows for matching receivers and a wake-up for the fan-out, both part
-- of the writer's transaction (a NOTIFY is delivered at commit, or not at all).
CREATE FUNCTION healthd_score_changes_published() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE FUNCTION healthd_alerts_published() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last_id BIGINT;
BEGIN
    SELECT max(id) INTO last_id FROM new_rows;
    IF last_id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (webhook_id, event_type, event_id, payload)
    SELECT w.id, 'alert.raised', n.id,
           jsonb_build_object(
               'event', 'alert.raised',
               'id', n.id::text,
               'account', jsonb_build_object('id', a.id::text, 'key', a.key, 'name', a.name, 'owner', a.owner),
               'rule', n.rule,
               'severity', upper(n.severity),
               'status', upper(n.status),
               'message', n.message,
               'drivers', n.drivers,
               'owner', n.owner,
               'assignee', n.assignee,
               'dueAt', n.due_at,
               'createdAt', n.created_at)
    FROM new_rows n
    JOIN accounts a ON a.id = n.account_id
    JOIN webhooks w ON w.enabled AND 'alert.raised' = ANY (w.events)
    WHERE (jsonb_typeof(w.filter -> 'accountKeys') IS DISTINCT FROM 'array' OR w.filter -> 'accountKeys' ? a.key)
      AND (jsonb_typeof(w.filter -> 'rules') IS DISTINCT FROM 'array' OR w.filter -> 'rules' ? n.rule)
      AND (jsonb_typeof(w.filter -> 'severities') IS DISTINCT FROM 'array' OR w.filter -> 'severities' ? upper(n.severity))
    ON CONFLICT (webhook_id, event_type, event_id) DO NOTHING;
    PERFORM pg_notify('healthd_events', json_build_object('kind', 'alert', 'id', last_id)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER score_changes_feed_lock BEFORE INSERT ON score_changes
    FOR EACH STATEMENT EXECUTE FUNCTION healthd_feed_lock();
CREATE TRIGGER score_changes_published AFTER INSERT ON score_changes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION healthd_score_changes_published();

CREATE TRIGGER alerts_feed_lock BEFORE INSERT ON alerts
    FOR EACH STATEMENT EXECUTE FUNCTION healthd_feed_lock();
CREATE TRIGGER alerts_published AFTER INSERT ON alerts
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION healthd_alerts_published();
