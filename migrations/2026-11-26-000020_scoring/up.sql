-- Scoring bookkeeping shared by every healthd process (one row).
-- last_full_*: the daily full rescore claims the run by moving last_full_started_at forward, so only
-- one process does it per day. key_features: the most used features, derived during full rescores
-- and reused by the per-connector-run rescores (models may name their own instead).
CREATE TABLE scoring_state (
    id                     SMALLINT PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    last_full_started_at   TIMESTAMPTZ,
    last_full_finished_at  TIMESTAMPTZ,
    last_full_accounts     INTEGER,
    key_features           TEXT[] NOT NULL DEFAULT '{}',
    key_features_at        TIMESTAMPTZ
);
INSERT INTO scoring_state (id) VALUES (1);

