//! Admin-only operations on API tokens.

use async_graphql::{Context, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};

use crate::auth::{self, Role};
use crate::db::DbPool;

use super::errors::{bad_input, internal};

#[derive(SimpleObject)]
pub struct ApiTokenInfo {
    pub id: ID,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    /// When a request last authenticated with this token, to the minute; null if never used.
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<auth::ApiToken> for ApiTokenInfo {
    fn from(t: auth::ApiToken) -> Self {
        ApiTokenInfo {
            id: ID(t.id.to_string()),
            name: t.name,
            role: Role::parse(&t.role).unwrap_or(Role::Viewer),
            created_at: t.created_at,
            last_used_at: t.last_used_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// A token just created: `token` is shown this once and never again.
#[derive(SimpleObject)]
pub struct CreatedApiToken {
    pub info: ApiTokenInfo,
    pub token: String,
}

#[derive(Default)]
pub struct AdminQuery;

#[Object]
impl AdminQuery {
    /// The caller's own identity and role.
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<Me> {
        let viewer = auth::require(ctx, Role::Viewer)?;
        Ok(Me {
            name: viewer.name,
            role: viewer.role,
        })
    }

    /// Every API token (never the secrets). Admin only.
    async fn api_tokens(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ApiTokenInfo>> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        let tokens = auth::tokens::list_tokens(pool).await.map_err(internal)?;
        Ok(tokens.into_iter().map(Into::into).collect())
    }
}

#[derive(SimpleObject)]
pub struct Me {
    pub name: String,
    pub role: Role,
}

#[derive(Default)]
pub struct AdminMutation;

#[Object]
impl AdminMutation {
    /// Creates an API token. Admin only.
    async fn create_api_token(
        &self,
        ctx: &Context<'_>,
        name: String,
        role: Role,
    ) -> async_graphql::Result<CreatedApiToken> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        match auth::create_token(pool, &name, role).await {
            Ok((info, token)) => Ok(CreatedApiToken {
                info: info.into(),
                token,
            }),
            Err(auth::TokenError::EmptyName) => Err(bad_input("token name must not be empty")),
            Err(e) => Err(internal(e)),
        }
    }

    /// Revokes a token; requests with it fail from now on. Admin only.
    async fn revoke_api_token(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<bool> {
        auth::require(ctx, Role::Admin)?;
        let id: i64 = id.parse().map_err(|_| bad_input("invalid token id"))?;
        let pool = ctx.data::<DbPool>()?;
        auth::tokens::revoke_token(pool, id).await.map_err(internal)
    }
}
