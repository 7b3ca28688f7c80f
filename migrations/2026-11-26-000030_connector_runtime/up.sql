-- Connector runtime: per-source daily usage (for connectors that send pre-aggregated days) and
-- indexes the scheduler and the run history use.

-- What each connector instance last said about a day's usage (UsageDaily records). A re-sent day
-- replaces the earlier figure: usage_daily gets the difference, so re-sending is harmless.
CREATE TABLE usage_daily_external (
    account_id  BIGINT NOT NULL,
    source      TEXT NOT NULL,
    day         DATE NOT NULL,
    user_id     TEXT NOT NULL DEFAULT '',
    event       TEXT NOT NULL,
    feature     TEXT NOT NULL DEFAULT '',
    events      BIGINT NOT NULL,
    PRIMARY KEY (account_id, source, day, user_id, event, feature)
);

-- The scheduler's claim query: enabled instances that are due.
CREATE INDEX connectors_due_idx ON connectors (next_run_at) WHERE enabled;

-- Finding runs whose process died (heartbeat too old).
CREATE INDEX connector_runs_running_idx ON connector_runs (heartbeat_at) WHERE status = 'running';
