//! The account read API: `accounts` (a Relay connection with filters, orders and keyset cursors),
//! `account(key:)`, and the `Account` type with its health, history, tickets, billing, usage and
//! adoption. Resolvers are thin: SQL lives in `crate::accounts`, and every nested field of
//! `Account` goes through the request's DataLoader (`loaders.rs`), one statement per batch.
//!
//! Other domains reuse these types: `Account` (build one with [`Account::from_row`] or
//! [`Account::load`]), `HealthScore`, `SignalScore`, `HealthTier` and `PageInfo`.

use std::sync::Arc;

use std::collections::HashMap;

use async_graphql::{
    Context, Enum, InputObject, InputType, InputValueError, InputValueResult, Lookahead, Object,
    Scalar, ScalarType, SelectionField, SimpleObject, Value, ID,
};
use bigdecimal::BigDecimal;
use chrono::{DateTime, Duration, NaiveDate, Utc};

use crate::accounts::billing::{BillingSummary, InvoiceQuery};
use crate::accounts::health::{self as health_data, HealthRecord, Signal};
use crate::accounts::tickets::TicketQuery;
use crate::accounts::usage::{self as usage_data, BucketSize, TimelineQuery};
use crate::accounts::{self as accounts_data, list, AccountRow, AccountsError};
use crate::app::AppState;
use crate::auth::{self, Role};
use crate::config::Limits;
use crate::db::DbPool;

use super::errors::{bad_input, internal};
use super::loaders::{
    account_loader, attached_loader, AccountById, AccountLoader, AdoptionOf, BillingOf,
    CurrentHealth, HealthHistory, ScoreAt,
};

/// Default page size of `accounts`, `supportTickets` and `invoices`.
const DEFAULT_PAGE: i32 = 20;
/// Default window of `healthHistory` and `usageTimeline`.
const DEFAULT_DAYS: i32 = 90;

/// Client-safe error: argument and cursor problems are shown, database problems are logged.
fn client_error(e: &AccountsError) -> async_graphql::Error {
    match e {
        AccountsError::InvalidCursor(_) | AccountsError::InvalidArgument(_) => {
            bad_input(e.to_string())
        }
        AccountsError::Db(_) => internal(e),
    }
}

fn load_error(e: Arc<AccountsError>) -> async_graphql::Error {
    client_error(&e)
}

fn max_page_size(ctx: &Context<'_>) -> i64 {
    ctx.data_opt::<AppState>()
        .map(|s| s.config.limits.max_page_size)
        .unwrap_or_else(|| Limits::default().max_page_size)
}

/// `first` with its default, checked against 0..=max_page_size.
fn page_size(ctx: &Context<'_>, first: Option<i32>, default: i32) -> async_graphql::Result<i64> {
    let first = i64::from(first.unwrap_or(default));
    let max = max_page_size(ctx);
    if first < 0 {
        return Err(bad_input(format!("`first` must be 0 or more, got {first}")));
    }
    if first > max {
        return Err(bad_input(format!(
            "`first` must be at most {max}, got {first}"
        )));
    }
    Ok(first)
}

fn check_days(days: i32) -> async_graphql::Result<()> {
    usage_data::check_days(days).map_err(|e| client_error(&e))
}

/// Complexity of a list field: its children once per expected item.
fn list_cost(items: Option<i32>, default: i32, child_complexity: usize) -> usize {
    let items = items.unwrap_or(default).clamp(1, 100_000) as usize;
    items.saturating_mul(child_complexity.max(1))
}

/// Complexity of a time series of `days` days: children once per started month of buckets.
fn series_cost(days: Option<i32>, per_bucket_days: i32, child_complexity: usize) -> usize {
    let days = days.unwrap_or(DEFAULT_DAYS).clamp(1, usage_data::MAX_DAYS);
    let buckets = (days / per_bucket_days.max(1)).max(1) as usize;
    buckets.div_ceil(30).saturating_mul(child_complexity.max(1))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------------------------
// Money, enums and inputs

/// An amount of money (`NUMERIC(14,2)` in the store).
#[derive(Debug, Clone, PartialEq)]
pub struct Money(pub BigDecimal);

/// An amount of money as a decimal string with exactly two decimals, e.g. `"1200.50"` (exact:
/// never a float). Input also accepts a number.
#[Scalar(name = "Money")]
impl ScalarType for Money {
    fn parse(value: Value) -> InputValueResult<Self> {
        let text = match &value {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) => n.to_string(),
            _ => return Err(InputValueError::expected_type(value)),
        };
        text.parse::<BigDecimal>()
            .map(|v| Money(accounts_data::money(v)))
            .map_err(|_| InputValueError::custom(format!("`{text}` is not an amount of money")))
    }

    fn to_value(&self) -> Value {
        Value::String(accounts_data::format_money(&self.0))
    }
}

/// Health tier (stored lower-case: `healthy`, `at_risk`, `critical`).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthTier {
    Healthy,
    AtRisk,
    Critical,
}

impl HealthTier {
    pub fn as_db(self) -> &'static str {
        match self {
            HealthTier::Healthy => "healthy",
            HealthTier::AtRisk => "at_risk",
            HealthTier::Critical => "critical",
        }
    }

    pub fn from_db(s: &str) -> Option<HealthTier> {
        match s.to_ascii_lowercase().as_str() {
            "healthy" => Some(HealthTier::Healthy),
            "at_risk" => Some(HealthTier::AtRisk),
            "critical" => Some(HealthTier::Critical),
            _ => None,
        }
    }
}

/// How `accounts` is ordered.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccountOrder {
    /// Worst score first (the default); never scored accounts after scored ones, by key.
    #[default]
    ScoreAsc,
    /// Best score first; never scored accounts last.
    ScoreDesc,
    /// Biggest drop since the previous score first; never scored accounts last.
    ScoreChange,
    /// By name, case-insensitive.
    Name,
    /// Soonest renewal first; accounts without a renewal date last.
    RenewalDate,
}

impl From<AccountOrder> for list::Order {
    fn from(o: AccountOrder) -> Self {
        match o {
            AccountOrder::ScoreAsc => list::Order::ScoreAsc,
            AccountOrder::ScoreDesc => list::Order::ScoreDesc,
            AccountOrder::ScoreChange => list::Order::ScoreChange,
            AccountOrder::Name => list::Order::Name,
            AccountOrder::RenewalDate => list::Order::RenewalDate,
        }
    }
}

/// Which accounts `accounts` lists. Every given part must match; an empty `tiers` list does not restrict.
#[derive(InputObject, Debug, Clone, Default)]
pub struct AccountFilter {
    /// Only accounts whose current score is in one of these tiers (never scored accounts never match).
    pub tiers: Option<Vec<HealthTier>>,
    /// Exact owner.
    pub owner: Option<String>,
    /// Case-insensitive substring of the name, key or domain.
    pub search: Option<String>,
    /// Renewal date from today through today + this many days.
    pub renewal_within_days: Option<i32>,
}

impl From<AccountFilter> for list::Filter {
    fn from(f: AccountFilter) -> Self {
        let mut tiers: Vec<String> = f
            .tiers
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.as_db().to_string())
            .collect();
        tiers.sort();
        tiers.dedup();
        list::Filter {
            tiers,
            owner: f.owner,
            search: f.search,
            renewal_within_days: f.renewal_within_days,
        }
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketStatus {
    New,
    Open,
    Pending,
    Solved,
    Closed,
}

impl TicketStatus {
    pub fn as_db(self) -> &'static str {
        match self {
            TicketStatus::New => "new",
            TicketStatus::Open => "open",
            TicketStatus::Pending => "pending",
            TicketStatus::Solved => "solved",
            TicketStatus::Closed => "closed",
        }
    }

    fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "new" => TicketStatus::New,
            "open" => TicketStatus::Open,
            "pending" => TicketStatus::Pending,
            "solved" => TicketStatus::Solved,
            "closed" => TicketStatus::Closed,
            _ => return None,
        })
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketPriority {
    Low,
    Normal,
    High,
    Urgent,
}

impl TicketPriority {
    fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "low" => TicketPriority::Low,
            "normal" => TicketPriority::Normal,
            "high" => TicketPriority::High,
            "urgent" => TicketPriority::Urgent,
            _ => return None,
        })
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionStatus {
    Trialing,
    Active,
    PastDue,
    Unpaid,
    Canceled,
}

impl SubscriptionStatus {
    fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "trialing" => SubscriptionStatus::Trialing,
            "active" => SubscriptionStatus::Active,
            "past_due" => SubscriptionStatus::PastDue,
            "unpaid" => SubscriptionStatus::Unpaid,
            "canceled" => SubscriptionStatus::Canceled,
            _ => return None,
        })
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceStatus {
    Draft,
    Open,
    Paid,
    Void,
    Uncollectible,
}

impl InvoiceStatus {
    fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "draft" => InvoiceStatus::Draft,
            "open" => InvoiceStatus::Open,
            "paid" => InvoiceStatus::Paid,
            "void" => InvoiceStatus::Void,
            "uncollectible" => InvoiceStatus::Uncollectible,
            _ => return None,
        })
    }
}

/// Bucket size of `usageTimeline`.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageBucketSize {
    #[default]
    Day,
    /// Weeks start on Monday.
    Week,
}

fn unknown_value(what: &str, value: &str) -> async_graphql::Error {
    internal(format!("unexpected stored {what} `{value}`"))
}

// ---------------------------------------------------------------------------------------------
// Loader keys from field arguments: shared by the resolvers and `prefetch`, so what a list
// prefetched is what each account's resolver asks the cache for.

fn history_key(
    loader: &AccountLoader,
    account_id: i64,
    days: Option<i32>,
) -> async_graphql::Result<HealthHistory> {
    let days = days.unwrap_or(DEFAULT_DAYS);
    check_days(days)?;
    Ok(HealthHistory {
        account_id,
        since: loader.now() - Duration::days(i64::from(days)),
    })
}

fn tickets_key(
    ctx: &Context<'_>,
    account_id: i64,
    first: Option<i32>,
    status: Option<Vec<TicketStatus>>,
) -> async_graphql::Result<TicketQuery> {
    let limit = page_size(ctx, first, DEFAULT_PAGE)?;
    let statuses = status.filter(|s| !s.is_empty()).map(|s| {
        let mut s: Vec<String> = s.into_iter().map(|t| t.as_db().to_string()).collect();
        s.sort();
        s.dedup();
        s
    });
    Ok(TicketQuery {
        account_id,
        limit,
        statuses,
    })
}

fn timeline_key(
    loader: &AccountLoader,
    account_id: i64,
    days: Option<i32>,
    bucket: Option<UsageBucketSize>,
) -> async_graphql::Result<TimelineQuery> {
    let days = days.unwrap_or(DEFAULT_DAYS);
    check_days(days)?;
    let bucket = match bucket.unwrap_or_default() {
        UsageBucketSize::Day => BucketSize::Day,
        UsageBucketSize::Week => BucketSize::Week,
    };
    Ok(TimelineQuery {
        account_id,
        start: usage_data::timeline_start(loader.today(), days, bucket),
        bucket,
    })
}

fn invoices_key(
    ctx: &Context<'_>,
    account_id: i64,
    first: Option<i32>,
) -> async_graphql::Result<InvoiceQuery> {
    Ok(InvoiceQuery {
        account_id,
        limit: page_size(ctx, first, DEFAULT_PAGE)?,
    })
}

fn score_at_key(account_id: i64, reference: DateTime<Utc>, days_before: i64) -> ScoreAt {
    ScoreAt {
        account_id,
        at: reference - Duration::days(days_before),
    }
}

/// The `Account` fields selected under `nodes` and `edges { node }` of a connection.
fn account_selections<'a>(look: &Lookahead<'a>) -> Vec<SelectionField<'a>> {
    let mut fields = Vec::new();
    for nodes in look.field("nodes").selection_fields() {
        fields.extend(nodes.selection_set());
    }
    for node in look.field("edges").field("node").selection_fields() {
        fields.extend(node.selection_set());
    }
    fields
}

/// A field argument as the resolver will see it; `None` when it does not parse (the resolver
/// reports that).
fn argument<T: InputType>(field: &SelectionField<'_>, name: &str) -> Option<T> {
    let value = field
        .arguments()
        .ok()?
        .into_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, v)| v);
    T::parse(value).ok()
}

/// Which of `fields` (selections on `Account`) ask for the 7- and 30-day changes of a score.
fn change_days(field: &SelectionField<'_>) -> Vec<i64> {
    let mut days = Vec::new();
    for sub in field.selection_set() {
        match sub.name() {
            "change7d" => days.push(7),
            "change30d" => days.push(30),
            _ => {}
        }
    }
    days.sort_unstable();
    days.dedup();
    days
}

/// Loads what `fields` select on the accounts `ids` with one `load_many` per key type, so the
/// per-account resolvers find every row in the request's cache and batching does not depend on
/// timing. Errors are left for the resolvers to load again and report.
pub async fn prefetch(ctx: &Context<'_>, fields: &[SelectionField<'_>], ids: &[i64]) {
    let Some(loader) = attached_loader(ctx) else {
        return;
    };
    if ids.is_empty() {
        return;
    }
    let l = loader.loader();
    let mut current = false;
    let mut current_change: Vec<i64> = Vec::new();
    let mut history: Vec<HealthHistory> = Vec::new();
    let mut history_change: Vec<i64> = Vec::new();
    let mut tickets: Vec<TicketQuery> = Vec::new();
    let mut billing = false;
    let mut invoices: Vec<InvoiceQuery> = Vec::new();
    let mut timelines: Vec<TimelineQuery> = Vec::new();
    let mut adoption = false;
    for field in fields {
        match field.name() {
            "health" => {
                current = true;
                current_change.extend(change_days(field));
            }
            "healthHistory" => {
                if let Some(days) = argument::<Option<i32>>(field, "days") {
                    history.extend(ids.iter().filter_map(|id| history_key(l, *id, days).ok()));
                }
                history_change.extend(change_days(field));
            }
            "supportTickets" => {
                let first = argument::<Option<i32>>(field, "first");
                let status = argument::<Option<Vec<TicketStatus>>>(field, "status");
                if let (Some(first), Some(status)) = (first, status) {
                    tickets.extend(
                        ids.iter()
                            .filter_map(|id| tickets_key(ctx, *id, first, status.clone()).ok()),
                    );
                }
            }
            "billing" => {
                billing = true;
                for sub in field.selection_set().filter(|s| s.name() == "invoices") {
                    if let Some(first) = argument::<Option<i32>>(&sub, "first") {
                        invoices.extend(
                            ids.iter()
                                .filter_map(|id| invoices_key(ctx, *id, first).ok()),
                        );
                    }
                }
            }
            "usageTimeline" => {
                let days = argument::<Option<i32>>(field, "days");
                let bucket = argument::<Option<UsageBucketSize>>(field, "bucket");
                if let (Some(days), Some(bucket)) = (days, bucket) {
                    timelines.extend(
                        ids.iter()
                            .filter_map(|id| timeline_key(l, *id, days, bucket).ok()),
                    );
                }
            }
            "featureAdoption" => adoption = true,
            _ => {}
        }
    }

    let health = async {
        if current {
            loader
                .load_many(ids.iter().map(|id| CurrentHealth(*id)))
                .await
                .unwrap_or_default()
        } else {
            HashMap::new()
        }
    };
    let history_rows = async {
        if history.is_empty() {
            HashMap::new()
        } else {
            loader.load_many(history).await.unwrap_or_default()
        }
    };
    let others = async {
        let _ = futures_util::join!(
            async {
                if !tickets.is_empty() {
                    let _ = loader.load_many(tickets).await;
                }
            },
            async {
                if billing {
                    let _ = loader.load_many(ids.iter().map(|id| BillingOf(*id))).await;
                }
            },
            async {
                if !invoices.is_empty() {
                    let _ = loader.load_many(invoices).await;
                }
            },
            async {
                if !timelines.is_empty() {
                    let _ = loader.load_many(timelines).await;
                }
            },
            async {
                if adoption {
                    let _ = loader.load_many(ids.iter().map(|id| AdoptionOf(*id))).await;
                }
            },
        );
    };
    let (health, history_rows, ()) = futures_util::join!(health, history_rows, others);

    // Second wave: the 7- and 30-day comparisons of the scores just loaded, in one batch.
    let mut score_at: Vec<ScoreAt> = Vec::new();
    let now = l.now();
    for (key, record) in &health {
        if record.is_some() {
            score_at.extend(current_change.iter().map(|d| score_at_key(key.0, now, *d)));
        }
    }
    for rows in history_rows.values() {
        for r in rows.iter() {
            score_at.extend(
                history_change
                    .iter()
                    .map(|d| score_at_key(r.account_id, r.computed_at, *d)),
            );
        }
    }
    if !score_at.is_empty() {
        let _ = loader.load_many(score_at).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Root fields

#[derive(Default)]
pub struct AccountsQuery;

#[Object]
impl AccountsQuery {
    /// Accounts, worst score first by default, `first` at a time (default 20) after the `after` cursor.
    #[graphql(complexity = "list_cost(first, DEFAULT_PAGE, child_complexity)")]
    async fn accounts(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<AccountFilter>,
        order_by: Option<AccountOrder>,
    ) -> async_graphql::Result<AccountConnection> {
        auth::require(ctx, Role::Viewer)?;
        let first = page_size(ctx, first, DEFAULT_PAGE)?;
        let filter: list::Filter = filter.unwrap_or_default().into();
        filter.validate().map_err(|e| client_error(&e))?;
        let order: list::Order = order_by.unwrap_or_default().into();
        let loader = account_loader(ctx)?;
        let today = loader.loader().today();
        let look = ctx.look_ahead();
        let wants_page = look.field("edges").exists()
            || look.field("nodes").exists()
            || look.field("pageInfo").exists();
        let page = if wants_page {
            let pool = ctx.data::<DbPool>()?;
            list::page(pool, &filter, order, first, after.as_deref(), today)
                .await
                .map_err(|e| client_error(&e))?
        } else {
            list::Page {
                items: Vec::new(),
                has_next_page: false,
            }
        };
        let ids: Vec<i64> = page.items.iter().map(|i| i.account.id).collect();
        prefetch(ctx, &account_selections(&look), &ids).await;
        let edges: Vec<AccountEdge> = page
            .items
            .into_iter()
            .map(|item| AccountEdge {
                cursor: item.cursor,
                node: Account::from_row(item.account),
            })
            .collect();
        let page_info = PageInfo {
            has_next_page: page.has_next_page,
            has_previous_page: after.is_some(),
            start_cursor: edges.first().map(|e| e.cursor.clone()),
            end_cursor: edges.last().map(|e| e.cursor.clone()),
        };
        Ok(AccountConnection {
            filter,
            today,
            edges,
            page_info,
        })
    }

    /// The account with this key.
    async fn account(
        &self,
        ctx: &Context<'_>,
        key: String,
    ) -> async_graphql::Result<Option<Account>> {
        auth::require(ctx, Role::Viewer)?;
        let pool = ctx.data::<DbPool>()?;
        let row = accounts_data::by_key(pool, &key)
            .await
            .map_err(|e| client_error(&e))?;
        Ok(row.map(Account::from_row))
    }
}

// ---------------------------------------------------------------------------------------------
// Connection

/// Relay page information.
#[derive(SimpleObject, Debug, Clone, Default)]
pub struct PageInfo {
    pub has_next_page: bool,
    /// True when the page was asked for with `after` (rows exist before it).
    pub has_previous_page: bool,
    pub start_cursor: Option<String>,
    pub end_cursor: Option<String>,
}

#[derive(SimpleObject, Clone)]
pub struct AccountEdge {
    /// Opaque; pass as `after` to continue after this account.
    pub cursor: String,
    pub node: Account,
}

pub struct AccountConnection {
    filter: list::Filter,
    today: NaiveDate,
    edges: Vec<AccountEdge>,
    page_info: PageInfo,
}

#[Object]
impl AccountConnection {
    /// How many accounts match the filter, across all pages.
    async fn total_count(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        let pool = ctx.data::<DbPool>()?;
        list::count(pool, &self.filter, self.today)
            .await
            .map_err(|e| client_error(&e))
    }

    async fn edges(&self) -> &[AccountEdge] {
        &self.edges
    }

    async fn nodes(&self) -> Vec<Account> {
        self.edges.iter().map(|e| e.node.clone()).collect()
    }

    async fn page_info(&self) -> &PageInfo {
        &self.page_info
    }
}

// ---------------------------------------------------------------------------------------------
// Account

/// A customer account.
#[derive(Clone, Debug)]
pub struct Account(pub Arc<AccountRow>);

impl Account {
    pub fn from_row(row: AccountRow) -> Self {
        Account(Arc::new(row))
    }

    /// The account with this internal id, batched with the request's other lookups (for `account`
    /// fields of other types: alerts, score changes).
    pub async fn load(
        ctx: &Context<'_>,
        account_id: i64,
    ) -> async_graphql::Result<Option<Account>> {
        let loader = account_loader(ctx)?;
        let row = loader
            .load_one(AccountById(account_id))
            .await
            .map_err(load_error)?;
        Ok(row.flatten().map(Account))
    }

    /// Internal id.
    pub fn account_id(&self) -> i64 {
        self.0.id
    }
}

#[Object]
impl Account {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    /// Stable public key.
    async fn key(&self) -> &str {
        &self.0.key
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn domain(&self) -> Option<&str> {
        self.0.domain.as_deref()
    }

    /// The customer success manager who owns the account.
    async fn owner(&self) -> Option<&str> {
        self.0.owner.as_deref()
    }

    async fn plan(&self) -> Option<&str> {
        self.0.plan.as_deref()
    }

    async fn seats(&self) -> Option<i32> {
        self.0.seats
    }

    /// Monthly recurring revenue, two decimals.
    async fn mrr(&self) -> Option<Money> {
        self.0.mrr.clone().map(Money)
    }

    async fn renewal_date(&self) -> Option<NaiveDate> {
        self.0.renewal_date
    }

    /// The latest score; null before the first scoring.
    async fn health(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<HealthScore>> {
        let loader = account_loader(ctx)?;
        let now = loader.loader().now();
        let record = loader
            .load_one(CurrentHealth(self.0.id))
            .await
            .map_err(load_error)?
            .flatten();
        Ok(record.map(|r| HealthScore::new((*r).clone(), now)))
    }

    /// Scores of the last `days` days, oldest first.
    #[graphql(complexity = "series_cost(days, 1, child_complexity)")]
    async fn health_history(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 90)] days: Option<i32>,
    ) -> async_graphql::Result<Vec<HealthScore>> {
        let loader = account_loader(ctx)?;
        let key = history_key(loader.loader(), self.0.id, days)?;
        let rows = loader
            .load_one(key)
            .await
            .map_err(load_error)?
            .unwrap_or_default();
        Ok(rows
            .iter()
            .map(|r| HealthScore::new(r.clone(), r.computed_at))
            .collect())
    }

    /// How many points each signal added or cost between `from` and `to` (default: now), with a
    /// change of model told apart from a change in behaviour. Null before the first score.
    async fn health_change(
        &self,
        ctx: &Context<'_>,
        from: DateTime<Utc>,
        to: Option<DateTime<Utc>>,
    ) -> async_graphql::Result<Option<super::scoring::HealthChange>> {
        super::scoring::account_health_change(ctx, self.0.id, from, to).await
    }

    /// Support tickets, newest opened first (`first` defaults to 20).
    #[graphql(complexity = "list_cost(first, DEFAULT_PAGE, child_complexity)")]
    async fn support_tickets(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        status: Option<Vec<TicketStatus>>,
    ) -> async_graphql::Result<Vec<SupportTicket>> {
        let key = tickets_key(ctx, self.0.id, first, status)?;
        let loader = account_loader(ctx)?;
        let tickets = loader
            .load_one(key)
            .await
            .map_err(load_error)?
            .unwrap_or_default();
        tickets
            .iter()
            .map(|t| {
                Ok(SupportTicket {
                    id: ID(t.ticket_id.clone()),
                    source: t.source.clone(),
                    subject: t.subject.clone(),
                    priority: TicketPriority::from_db(&t.priority)
                        .ok_or_else(|| unknown_value("ticket priority", &t.priority))?,
                    status: TicketStatus::from_db(&t.status)
                        .ok_or_else(|| unknown_value("ticket status", &t.status))?,
                    opened_at: t.opened_at,
                    closed_at: t.closed_at,
                    csat: t.csat.map(i32::from),
                })
            })
            .collect()
    }

    /// Subscription and invoices; null when the account has neither.
    async fn billing(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Billing>> {
        let loader = account_loader(ctx)?;
        let today = loader.loader().today();
        let summary = loader
            .load_one(BillingOf(self.0.id))
            .await
            .map_err(load_error)?
            .flatten();
        Ok(summary.map(|summary| Billing { summary, today }))
    }

    /// Activity per day or week (weeks start Monday) over the last `days` days, from the daily
    /// rollup; buckets without activity are zeros.
    #[graphql(
        complexity = "series_cost(days, if bucket == Some(UsageBucketSize::Week) { 7 } else { 1 }, child_complexity)"
    )]
    async fn usage_timeline(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 90)] days: Option<i32>,
        #[graphql(default_with = "Some(UsageBucketSize::Day)")] bucket: Option<UsageBucketSize>,
    ) -> async_graphql::Result<Vec<UsageBucket>> {
        let loader = account_loader(ctx)?;
        let key = timeline_key(loader.loader(), self.0.id, days, bucket)?;
        let buckets = loader
            .load_one(key)
            .await
            .map_err(load_error)?
            .unwrap_or_default();
        Ok(buckets
            .iter()
            .map(|b| UsageBucket {
                start: b.start,
                active_users: b.active_users,
                logins: b.logins,
                page_views: b.page_views,
                events: b.events,
                features: b
                    .features
                    .iter()
                    .map(|f| FeatureCount {
                        feature: f.feature.clone(),
                        count: f.count,
                    })
                    .collect(),
            })
            .collect())
    }

    /// Per feature: first and last use and distinct users in the last 30 days (most users first).
    async fn feature_adoption(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<FeatureAdoption>> {
        let loader = account_loader(ctx)?;
        let rows = loader
            .load_one(AdoptionOf(self.0.id))
            .await
            .map_err(load_error)?
            .unwrap_or_default();
        Ok(rows
            .iter()
            .map(|a| FeatureAdoption {
                feature: a.feature.clone(),
                first_used: a.first_used,
                last_used: a.last_used,
                users_last_30_days: a.users_last_30_days,
            })
            .collect())
    }

    // -- Extension point for other domains: one-method delegates to their own modules. --
    // `healthChange(from: DateTime!, to: DateTime)` (scoring) and `alerts: [Alert!]!` (alerts)
    // go here; use `self.0.id` as the account id and batch through a DataLoader of your own.

    /// The account's alerts, newest first: unresolved ones, plus resolved ones with
    /// `includeResolved: true`.
    async fn alerts(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = false)] include_resolved: bool,
    ) -> async_graphql::Result<Vec<super::alerts::Alert>> {
        super::alerts::account_alerts(ctx, self.0.id, include_resolved).await
    }
}

// ---------------------------------------------------------------------------------------------
// Health

/// One signal's part in a score.
#[derive(SimpleObject, Debug, Clone, PartialEq)]
pub struct SignalScore {
    /// Stable key (`login_recency`, `usage_trend`, `billing`, `freshness:usage`...).
    pub key: String,
    pub label: String,
    /// The raw number (days, users, percent...); null when the signal has no data.
    pub value: Option<f64>,
    /// 0–1; null when the signal has no data.
    pub score: Option<f64>,
    /// Points this signal could earn in this score.
    pub weight: f64,
    /// Points earned.
    pub contribution: f64,
    /// Points lost.
    pub impact: f64,
    /// Plain words with the real numbers.
    pub explanation: String,
    /// No data of this kind for the account: left out, its weight shared by the others.
    pub missing: bool,
    /// This entry reports data older than allowed.
    pub stale: bool,
}

impl From<&Signal> for SignalScore {
    fn from(s: &Signal) -> Self {
        SignalScore {
            key: s.key.clone(),
            label: s.label.clone(),
            value: if s.missing { None } else { s.value },
            score: if s.missing { None } else { s.score },
            weight: s.weight,
            contribution: s.contribution,
            impact: s.impact,
            explanation: s.explanation.clone(),
            missing: s.missing,
            stale: s.stale,
        }
    }
}

/// A health score with its explanation.
#[derive(Debug, Clone)]
pub struct HealthScore {
    record: HealthRecord,
    /// The moment 7- and 30-day changes are measured back from: now for the current score, the
    /// score's own time for history rows.
    reference: DateTime<Utc>,
}

impl HealthScore {
    pub fn new(record: HealthRecord, reference: DateTime<Utc>) -> Self {
        HealthScore { record, reference }
    }

    async fn change_since(
        &self,
        ctx: &Context<'_>,
        days: i64,
    ) -> async_graphql::Result<Option<f64>> {
        let loader = account_loader(ctx)?;
        let then = loader
            .load_one(score_at_key(self.record.account_id, self.reference, days))
            .await
            .map_err(load_error)?
            .flatten();
        Ok(then.map(|s| round2(self.record.score - s)))
    }
}

#[Object]
impl HealthScore {
    /// 0–100.
    async fn score(&self) -> f64 {
        self.record.score
    }

    async fn tier(&self) -> async_graphql::Result<HealthTier> {
        HealthTier::from_db(&self.record.tier)
            .ok_or_else(|| unknown_value("tier", &self.record.tier))
    }

    async fn computed_at(&self) -> DateTime<Utc> {
        self.record.computed_at
    }

    /// Some data behind this score is older than allowed; the drivers say which.
    async fn stale(&self) -> bool {
        self.record.stale
    }

    /// Version of the scoring model that computed this score.
    async fn model_version(&self) -> i32 {
        self.record.model_version
    }

    async fn signals(&self) -> Vec<SignalScore> {
        self.record.signals.iter().map(SignalScore::from).collect()
    }

    /// The signals that cost points, worst first (stale-data entries before all others).
    async fn drivers(&self) -> Vec<SignalScore> {
        health_data::drivers(&self.record.signals)
            .iter()
            .map(SignalScore::from)
            .collect()
    }

    /// Points gained (or lost, negative) since the previous score; null for the first score.
    async fn change(&self) -> Option<f64> {
        self.record
            .previous_score
            .map(|p| round2(self.record.score - p))
    }

    /// Points gained (or lost) against the score 7 days before; null when there was none.
    #[graphql(name = "change7d")]
    async fn change_7d(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<f64>> {
        self.change_since(ctx, 7).await
    }

    /// Points gained (or lost) against the score 30 days before; null when there was none.
    #[graphql(name = "change30d")]
    async fn change_30d(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<f64>> {
        self.change_since(ctx, 30).await
    }
}

// ---------------------------------------------------------------------------------------------
// Tickets, billing, usage

#[derive(SimpleObject, Debug, Clone)]
pub struct SupportTicket {
    /// The ticket's id in its source system.
    pub id: ID,
    /// Connector instance it came from.
    pub source: String,
    pub subject: Option<String>,
    pub priority: TicketPriority,
    pub status: TicketStatus,
    pub opened_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    /// Satisfaction rating 1–5, when given.
    pub csat: Option<i32>,
}

/// Billing state. An invoice is overdue when it is `OPEN` or `UNCOLLECTIBLE`, unpaid, and its due
/// date has passed.
pub struct Billing {
    summary: Arc<BillingSummary>,
    today: NaiveDate,
}

#[Object]
impl Billing {
    /// Status of the most relevant subscription (a live one before a canceled one, then the latest
    /// period end); null without subscriptions.
    async fn status(&self) -> async_graphql::Result<Option<SubscriptionStatus>> {
        self.summary
            .status
            .as_deref()
            .map(|s| {
                SubscriptionStatus::from_db(s)
                    .ok_or_else(|| unknown_value("subscription status", s))
            })
            .transpose()
    }

    /// MRR of the live subscriptions (0.00 when all are canceled).
    async fn mrr(&self) -> Option<Money> {
        self.summary.mrr.clone().map(Money)
    }

    async fn current_period_end(&self) -> Option<DateTime<Utc>> {
        self.summary.current_period_end
    }

    async fn cancel_at_period_end(&self) -> bool {
        self.summary.cancel_at_period_end
    }

    /// Total of overdue invoices.
    async fn overdue_amount(&self) -> Money {
        Money(self.summary.overdue_amount.clone())
    }

    async fn overdue_invoice_count(&self) -> i64 {
        self.summary.overdue_invoice_count
    }

    /// Days since the oldest overdue invoice was due; null when none is overdue.
    async fn days_oldest_overdue(&self) -> Option<i32> {
        self.summary.days_oldest_overdue
    }

    /// Invoices, latest due date first.
    #[graphql(complexity = "list_cost(first, DEFAULT_PAGE, child_complexity)")]
    async fn invoices(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: Option<i32>,
    ) -> async_graphql::Result<Vec<Invoice>> {
        let key = invoices_key(ctx, self.summary.account_id, first)?;
        let loader = account_loader(ctx)?;
        let invoices = loader
            .load_one(key)
            .await
            .map_err(load_error)?
            .unwrap_or_default();
        invoices
            .iter()
            .map(|i| {
                Ok(Invoice {
                    id: ID(i.invoice_id.clone()),
                    source: i.source.clone(),
                    amount: Money(i.amount.clone()),
                    currency: i.currency.clone(),
                    due_date: i.due_date,
                    paid_at: i.paid_at,
                    status: InvoiceStatus::from_db(&i.status)
                        .ok_or_else(|| unknown_value("invoice status", &i.status))?,
                    days_overdue: i.days_overdue(self.today),
                    overdue: i.days_overdue(self.today).is_some(),
                })
            })
            .collect()
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Invoice {
    /// The invoice's id in its source system.
    pub id: ID,
    pub source: String,
    pub amount: Money,
    pub currency: String,
    pub due_date: NaiveDate,
    pub paid_at: Option<DateTime<Utc>>,
    pub status: InvoiceStatus,
    pub overdue: bool,
    /// Days past the due date, when overdue.
    pub days_overdue: Option<i64>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct FeatureCount {
    pub feature: String,
    pub count: i64,
}

/// Activity in one day, or one week starting Monday.
#[derive(SimpleObject, Debug, Clone)]
pub struct UsageBucket {
    pub start: NaiveDate,
    /// Distinct known users active in the bucket.
    pub active_users: i64,
    pub logins: i64,
    pub page_views: i64,
    /// All events.
    pub events: i64,
    /// Events per feature, most used first.
    pub features: Vec<FeatureCount>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct FeatureAdoption {
    pub feature: String,
    pub first_used: NaiveDate,
    pub last_used: NaiveDate,
    /// Distinct users of the feature in the 30 days through today.
    pub users_last_30_days: i64,
}
