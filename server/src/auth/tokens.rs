//! API tokens. Only a SHA-256 digest of each token is stored: tokens are 256 random bits,
//! so a fast hash is enough (a slow password hash adds nothing for high-entropy secrets).

use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl};
use diesel_async::RunQueryDsl;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{Role, Viewer};
use crate::db::schema::api_tokens;
use crate::db::{DbError, DbPool};

/// How stale `api_tokens.last_used_at` may get before a request refreshes it.
const LAST_USED_RESOLUTION_SECS: i64 = 60;

/// Prefix that makes healthd tokens recognisable in logs and secret scanners.
const TOKEN_PREFIX: &str = "hd_";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token name must not be empty")]
    EmptyName,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for TokenError {
    fn from(e: diesel::result::Error) -> Self {
        TokenError::Db(e.into())
    }
}

#[derive(Debug, Clone, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = api_tokens)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// Creates a token and returns it in clear text: the only time it is ever visible.
pub async fn create_token(
    pool: &DbPool,
    name: &str,
    role: Role,
) -> Result<(ApiToken, String), TokenError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(TokenError::EmptyName);
    }
    let secret = generate();
    let mut conn = pool.get().await.map_err(DbError::from)?;
    let token = diesel::insert_into(api_tokens::table)
        .values((
            api_tokens::name.eq(name),
            api_tokens::role.eq(role.as_str()),
            api_tokens::token_hash.eq(hash_token(&secret)),
        ))
        .returning(<ApiToken as diesel::SelectableHelper<diesel::pg::Pg>>::as_returning())
        .get_result(&mut conn)
        .await?;
    Ok((token, secret))
}

/// Resolves a bearer token to its caller; `None` for unknown or revoked tokens.
pub async fn authenticate(pool: &DbPool, secret: &str) -> Result<Option<Viewer>, DbError> {
    if !secret.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    let mut conn = pool.get().await?;
    let found: Option<(i64, String, String, Option<DateTime<Utc>>)> = api_tokens::table
        .filter(api_tokens::token_hash.eq(hash_token(secret)))
        .filter(api_tokens::revoked_at.is_null())
        .select((
            api_tokens::id,
            api_tokens::name,
            api_tokens::role,
            api_tokens::last_used_at,
        ))
        .first(&mut conn)
        .await
        .optional()?;
    if let Some((token_id, _, _, last_used)) = &found {
        // `lastUsedAt` to the minute: at most one write per token a minute, not one per request.
        let due = last_used
            .is_none_or(|t| Utc::now() - t >= chrono::Duration::seconds(LAST_USED_RESOLUTION_SECS));
        if due {
            let stamped = diesel::update(api_tokens::table.filter(api_tokens::id.eq(token_id)))
                .set(api_tokens::last_used_at.eq(diesel::dsl::now))
                .execute(&mut conn)
                .await;
            if let Err(e) = stamped {
                // The caller is authenticated either way; the stamp is bookkeeping.
                tracing::warn!(error = %e, token_id, "could not record the token's last use");
            }
        }
    }
    Ok(found.and_then(|(token_id, name, role, _)| {
        Role::parse(&role).map(|role| Viewer {
            token_id,
            name,
            role,
        })
    }))
}

pub async fn list_tokens(pool: &DbPool) -> Result<Vec<ApiToken>, DbError> {
    let mut conn = pool.get().await?;
    Ok(api_tokens::table
        .order(api_tokens::id.asc())
        .select(<ApiToken as diesel::SelectableHelper<diesel::pg::Pg>>::as_select())
        .load(&mut conn)
        .await?)
}

/// Revokes a token by id; returns whether one was revoked.
pub async fn revoke_token(pool: &DbPool, id: i64) -> Result<bool, DbError> {
    let mut conn = pool.get().await?;
    let n = diesel::update(api_tokens::table.filter(api_tokens::id.eq(id)))
        .filter(api_tokens::revoked_at.is_null())
        .set(api_tokens::revoked_at.eq(Utc::now()))
        .execute(&mut conn)
        .await?;
    Ok(n > 0)
}
