ALTER TABLE health_current RESET (toast_tuple_target, fillfactor);
ALTER TABLE health_current DROP COLUMN IF EXISTS signals_digest;
