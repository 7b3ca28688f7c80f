-- The extension is left installed: other objects may use it.
DROP INDEX IF EXISTS accounts_domain_trgm_idx;
DROP INDEX IF EXISTS accounts_key_trgm_idx;
DROP INDEX IF EXISTS accounts_name_trgm_idx;
