//! Assembles the schema from each domain's query, mutation and subscription parts.

use async_graphql::{MergedObject, MergedSubscription, Schema};

use crate::app::AppState;

use super::accounts::AccountsQuery;
use super::admin::{AdminMutation, AdminQuery};
use super::alerts::{AlertsMutation, AlertsQuery};
use super::connectors::{ConnectorsMutation, ConnectorsQuery};
use super::scoring::{ScoringMutation, ScoringQuery};
use super::subscriptions::FeedSubscription;

#[derive(MergedObject, Default)]
pub struct Query(
    AccountsQuery,
    AdminQuery,
    ScoringQuery,
    AlertsQuery,
    ConnectorsQuery,
);

#[derive(MergedObject, Default)]
pub struct Mutation(
    AdminMutation,
    ScoringMutation,
    AlertsMutation,
    ConnectorsMutation,
);

#[derive(MergedSubscription, Default)]
pub struct Subscription(FeedSubscription);

pub type HealthdSchema = Schema<Query, Mutation, Subscription>;

/// The schema with limits from config. `state` is available to resolvers as `ctx.data::<AppState>()`.
pub fn build_schema(state: Option<AppState>) -> HealthdSchema {
    let limits = state
        .as_ref()
        .map(|s| s.config.limits.clone())
        .unwrap_or_default();
    let mut builder = Schema::build(
        Query::default(),
        Mutation::default(),
        Subscription::default(),
    )
    .limit_depth(limits.max_query_depth)
    .limit_complexity(limits.max_query_complexity);
    if let Some(state) = state {
        builder = builder.data(state.pool.clone()).data(state);
    }
    builder.finish()
}

/// The SDL that `healthd schema` prints and `schema.graphql` must equal.
pub fn sdl() -> String {
    build_schema(None).sdl()
}
