DROP INDEX IF EXISTS connector_runs_running_idx;
DROP INDEX IF EXISTS connectors_due_idx;
DROP TABLE IF EXISTS usage_daily_external;
