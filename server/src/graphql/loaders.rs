//! DataLoaders, created per request so cached rows never outlive it.
//!
//! One [`AccountLoader`] serves every nested field of `Account`: each key type below is its own
//! batch queue, and each batch is one SQL statement in `crate::accounts` (`account_id = ANY($1)`, or
//! parallel arrays for keys that carry arguments). The loader also fixes the request's clock
//! (`now`, `today`), so all fields of one response agree on what "the last 90 days" means.
//!
//! Batching by delay alone depends on timing: resolving a big page can take longer than the
//! loader's delay, which splits a batch. So lists of accounts prefetch what the query selects, with
//! one `load_many` per key type (`graphql::accounts::prefetch`), and the per-request cache hands the
//! rows to each account's resolvers. Every key gets a value (`None` when there is no row), so
//! misses are cached too. Fields reached another way still batch by delay.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use async_graphql::dataloader::{DataLoader, HashMapCache, Loader};
use async_graphql::{Context, Request};
use chrono::{DateTime, NaiveDate, Utc};

use crate::accounts::billing::{BillingSummary, Invoice, InvoiceQuery};
use crate::accounts::health::HealthRecord;
use crate::accounts::tickets::{Ticket, TicketQuery};
use crate::accounts::usage::{FeatureAdoption, TimelineQuery, UsageBucket};
use crate::accounts::{self, AccountRow, AccountsError};
use crate::db::DbPool;

/// Batches every per-account read of one request.
pub struct AccountLoader {
    pool: DbPool,
    now: DateTime<Utc>,
}

impl AccountLoader {
    pub fn new(pool: DbPool) -> Self {
        AccountLoader {
            pool,
            now: Utc::now(),
        }
    }

    /// The request's "now".
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The request's "today" (UTC).
    pub fn today(&self) -> NaiveDate {
        self.now.date_naive()
    }

    pub fn pool(&self) -> &DbPool {
        &self.pool
    }
}

pub type AccountDataLoader = DataLoader<AccountLoader, HashMapCache>;

/// Errors are shared by every key of a failed batch.
pub type LoadError = Arc<AccountsError>;

/// The largest batch sent in one statement (a page of `max_page_size` accounts times a few keys each).
const MAX_BATCH: usize = 10_000;

/// Attaches this request's loaders.
pub fn attach(request: Request, pool: &DbPool) -> Request {
    request
        .data(new_loader(pool))
        .data(crate::graphql::alerts::new_alerts_loader(pool))
}

fn new_loader(pool: &DbPool) -> Arc<AccountDataLoader> {
    Arc::new(
        DataLoader::with_cache(
            AccountLoader::new(pool.clone()),
            tokio::spawn,
            HashMapCache::default(),
        )
        .max_batch_size(MAX_BATCH),
    )
}

/// The loader [`attach`] added to the request, if any.
pub fn attached_loader(ctx: &Context<'_>) -> Option<Arc<AccountDataLoader>> {
    ctx.data_opt::<Arc<AccountDataLoader>>().cloned()
}

/// The request's account loader. A request executed without [`attach`] (a test, another entry
/// point) still works, without batching across fields.
pub fn account_loader(ctx: &Context<'_>) -> async_graphql::Result<Arc<AccountDataLoader>> {
    if let Some(loader) = attached_loader(ctx) {
        return Ok(loader);
    }
    tracing::debug!("no request DataLoader attached; using a per-field one");
    Ok(new_loader(ctx.data::<DbPool>()?))
}

/// An account by internal id (for other domains' `account` fields: alerts, score changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccountById(pub i64);

/// The current score (`health_current`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CurrentHealth(pub i64);

/// History rows from `since` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HealthHistory {
    pub account_id: i64,
    pub since: DateTime<Utc>,
}

/// The score as of a moment (latest history row at or before `at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScoreAt {
    pub account_id: i64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BillingOf(pub i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdoptionOf(pub i64);

fn err(e: AccountsError) -> LoadError {
    Arc::new(e)
}

/// Values returned in key order.
fn by_position<K: Clone + Eq + Hash, V>(keys: &[K], values: Vec<V>) -> HashMap<K, V> {
    keys.iter().cloned().zip(values).collect()
}

/// A value for every key (`None` where `found` has no row), so misses are cached too.
fn every_key<K, V>(
    keys: &[K],
    id: impl Fn(&K) -> i64,
    mut found: HashMap<i64, V>,
) -> HashMap<K, Option<Arc<V>>>
where
    K: Clone + Eq + Hash,
{
    keys.iter()
        .map(|k| (k.clone(), found.remove(&id(k)).map(Arc::new)))
        .collect()
}

impl Loader<AccountById> for AccountLoader {
    type Value = Option<Arc<AccountRow>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[AccountById],
    ) -> Result<HashMap<AccountById, Self::Value>, Self::Error> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let rows = accounts::by_ids(&self.pool, &ids).await.map_err(err)?;
        let rows = rows.into_iter().map(|r| (r.id, r)).collect();
        Ok(every_key(keys, |k| k.0, rows))
    }
}

impl Loader<CurrentHealth> for AccountLoader {
    type Value = Option<Arc<HealthRecord>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[CurrentHealth],
    ) -> Result<HashMap<CurrentHealth, Self::Value>, Self::Error> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let rows = accounts::health::current(&self.pool, &ids)
            .await
            .map_err(err)?;
        Ok(every_key(keys, |k| k.0, rows))
    }
}

impl Loader<HealthHistory> for AccountLoader {
    type Value = Arc<Vec<HealthRecord>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[HealthHistory],
    ) -> Result<HashMap<HealthHistory, Self::Value>, Self::Error> {
        let q: Vec<(i64, DateTime<Utc>)> = keys.iter().map(|k| (k.account_id, k.since)).collect();
        let rows = accounts::health::history(&self.pool, &q)
            .await
            .map_err(err)?;
        Ok(by_position(keys, rows.into_iter().map(Arc::new).collect()))
    }
}

impl Loader<ScoreAt> for AccountLoader {
    type Value = Option<f64>;
    type Error = LoadError;

    async fn load(&self, keys: &[ScoreAt]) -> Result<HashMap<ScoreAt, Self::Value>, Self::Error> {
        let q: Vec<(i64, DateTime<Utc>)> = keys.iter().map(|k| (k.account_id, k.at)).collect();
        let scores = accounts::health::scores_at(&self.pool, &q)
            .await
            .map_err(err)?;
        Ok(by_position(keys, scores))
    }
}

impl Loader<TicketQuery> for AccountLoader {
    type Value = Arc<Vec<Ticket>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[TicketQuery],
    ) -> Result<HashMap<TicketQuery, Self::Value>, Self::Error> {
        let rows = accounts::tickets::tickets(&self.pool, keys)
            .await
            .map_err(err)?;
        Ok(by_position(keys, rows.into_iter().map(Arc::new).collect()))
    }
}

impl Loader<BillingOf> for AccountLoader {
    type Value = Option<Arc<BillingSummary>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[BillingOf],
    ) -> Result<HashMap<BillingOf, Self::Value>, Self::Error> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let rows = accounts::billing::summaries(&self.pool, &ids, self.today())
            .await
            .map_err(err)?;
        Ok(every_key(keys, |k| k.0, rows))
    }
}

impl Loader<InvoiceQuery> for AccountLoader {
    type Value = Arc<Vec<Invoice>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[InvoiceQuery],
    ) -> Result<HashMap<InvoiceQuery, Self::Value>, Self::Error> {
        let rows = accounts::billing::invoices(&self.pool, keys)
            .await
            .map_err(err)?;
        Ok(by_position(keys, rows.into_iter().map(Arc::new).collect()))
    }
}

impl Loader<TimelineQuery> for AccountLoader {
    type Value = Arc<Vec<UsageBucket>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[TimelineQuery],
    ) -> Result<HashMap<TimelineQuery, Self::Value>, Self::Error> {
        let rows = accounts::usage::timelines(&self.pool, keys, self.today())
            .await
            .map_err(err)?;
        Ok(by_position(keys, rows.into_iter().map(Arc::new).collect()))
    }
}

impl Loader<AdoptionOf> for AccountLoader {
    type Value = Arc<Vec<FeatureAdoption>>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[AdoptionOf],
    ) -> Result<HashMap<AdoptionOf, Self::Value>, Self::Error> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let mut rows = accounts::usage::adoption(&self.pool, &ids, self.today())
            .await
            .map_err(err)?;
        Ok(keys
            .iter()
            .map(|k| (*k, Arc::new(rows.remove(&k.0).unwrap_or_default())))
            .collect())
    }
}
