-- Substring search over account name, key and domain (`accounts(filter: {search: ...})`, an ILIKE
-- '%text%') uses trigram indexes. pg_trgm ships with PostgreSQL's contrib modules and is a trusted
-- extension (the database owner may create it). Where it is not installed or may not be created,
-- search falls back to a sequential scan and everything else works the same.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        RAISE NOTICE 'pg_trgm is not available: account search will scan the accounts table';
        RETURN;
    END IF;
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot create extension pg_trgm: account search will scan the accounts table';
        RETURN;
    END;
    CREATE INDEX IF NOT EXISTS accounts_name_trgm_idx ON accounts USING gin (name gin_trgm_ops);
    CREATE INDEX IF NOT EXISTS accounts_key_trgm_idx ON accounts USING gin (key gin_trgm_ops);
    CREATE INDEX IF NOT EXISTS accounts_domain_trgm_idx ON accounts USING gin (domain gin_trgm_ops);
END
$$;
