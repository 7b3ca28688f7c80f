//! Who is calling: API tokens, roles and the checks resolvers make.

pub mod tokens;

pub use tokens::{authenticate, create_token, ApiToken, TokenError};

use async_graphql::{Context, ErrorExtensions};

/// What a token may do. Ordered: each role can do everything the lower ones can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, async_graphql::Enum)]
pub enum Role {
    /// Reads everything.
    Viewer,
    /// Also changes alerts (acknowledge, resolve, snooze, assign, feedback).
    Editor,
    /// Also manages connectors, scoring models, webhooks and tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "editor" => Some(Role::Editor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The authenticated caller of one request, put in the GraphQL context.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub token_id: i64,
    pub name: String,
    pub role: Role,
}

/// Fails with a clear `FORBIDDEN` error unless the caller has at least `role`.
pub fn require(ctx: &Context<'_>, role: Role) -> async_graphql::Result<Viewer> {
    let viewer = ctx.data_opt::<Viewer>().ok_or_else(|| {
        async_graphql::Error::new("authentication required: send `Authorization: Bearer <token>`")
            .extend_with(|_, e| e.set("code", "UNAUTHENTICATED"))
    })?;
    if viewer.role < role {
        return Err(async_graphql::Error::new(format!(
            "this operation needs the {} role; your token `{}` has the {} role",
            role.as_str(),
            viewer.name,
            viewer.role.as_str()
        ))
        .extend_with(|_, e| e.set("code", "FORBIDDEN")));
    }
    Ok(viewer.clone())
}
