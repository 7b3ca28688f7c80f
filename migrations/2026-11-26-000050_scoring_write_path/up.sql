-- The rescore's write path is dominated by storing breakdowns: every changed score writes its
-- signals to health_current (out of line, see 000021), a copy to health_scores and its drivers to
-- score_changes. lz4 compresses and decompresses several times faster than the default pglz for
-- these 1-2 kB JSON documents (the in-database history copy decompresses and recompresses each
-- one). Servers built without lz4 keep pglz. Existing values keep their method until rewritten.
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
