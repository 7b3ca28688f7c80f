ALTER TABLE connectors DROP COLUMN IF EXISTS last_success_at, DROP COLUMN IF EXISTS records_ingested;
