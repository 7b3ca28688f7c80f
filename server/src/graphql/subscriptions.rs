//! GraphQL subscriptions: `scoreChanged` and `alertRaised`, served from this process's feed
//! fan-out ([`crate::feed::FeedHub`]). With `after`, a subscriber first receives everything after
//! that id, then live events, in order, none twice.

use std::sync::Arc;

use async_graphql::{Context, Subscription, ID};
use futures_util::{Stream, StreamExt};

use crate::alerts::store::AlertFilterSpec;
use crate::app::AppState;
use crate::auth::{self, Role};
use crate::feed::{FeedHub, ScoreChangeFilterSpec};

use super::alerts::{Alert, AlertFilter, ScoreChange, ScoreChangeFilter};
use super::errors::{bad_input, internal};

/// The hub put in the schema data, or this process's shared hub for the state's database.
fn hub(ctx: &Context<'_>) -> async_graphql::Result<FeedHub> {
    if let Some(hub) = ctx.data_opt::<FeedHub>() {
        return Ok(hub.clone());
    }
    Ok(FeedHub::shared(ctx.data::<AppState>()?))
}

fn parse_after(after: Option<ID>) -> async_graphql::Result<Option<i64>> {
    after
        .map(|a| {
            a.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                bad_input(format!("`after` must be a feed id, got `{}`", a.as_str()))
            })
        })
        .transpose()
}

#[derive(Default)]
pub struct FeedSubscription;

#[Subscription]
impl FeedSubscription {
    /// Score changes matching `filter`: with `after`, those after that id first (a reconnecting
    /// client loses nothing), then live ones.
    async fn score_changed(
        &self,
        ctx: &Context<'_>,
        filter: Option<ScoreChangeFilter>,
        after: Option<ID>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<ScoreChange>>> {
        auth::require(ctx, Role::Viewer)?;
        let after = parse_after(after)?;
        let spec = ScoreChangeFilterSpec::from(filter.unwrap_or_default());
        let stream = hub(ctx)?
            .score_changes(after, move |row| spec.matches(row))
            .await
            .map_err(internal)?;
        Ok(stream.map(|item| item.map(ScoreChange).map_err(internal)))
    }

    /// Alerts raised that match `filter`: with `after`, those after that id first, then live ones.
    async fn alert_raised(
        &self,
        ctx: &Context<'_>,
        filter: Option<AlertFilter>,
        after: Option<ID>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<Alert>>> {
        auth::require(ctx, Role::Viewer)?;
        let after = parse_after(after)?;
        let spec = AlertFilterSpec::from(filter.unwrap_or_default());
        let stream = hub(ctx)?
            .alerts(after, move |row| spec.matches(row))
            .await
            .map_err(internal)?;
        Ok(stream.map(|item| item.map(|row| Alert(Arc::clone(&row))).map_err(internal)))
    }
}
