-- Running totals on the instance, so listing connectors never aggregates the run history.
ALTER TABLE connectors
    ADD COLUMN records_ingested BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN last_success_at TIMESTAMPTZ;

UPDATE connectors c
SET records_ingested = t.total, last_success_at = t.last_success
FROM (
    SELECT connector_id, sum(records_ingested)::bigint AS total,
           max(finished_at) FILTER (WHERE status = 'succeeded') AS last_success
    FROM connector_runs GROUP BY connector_id
) t
WHERE t.connector_id = c.id;
