//! The per-process fan-out: one dedicated `LISTEN healthd_events` connection per process, which on
//! each hint (and on a timer, as a safety net) reads new `score_changes` and `alerts` rows by id
//! and broadcasts them to the local subscribers.
//!
//! A subscriber asking for `after` first replays the rows after that id from the database, then
//! switches to the broadcast; it tracks the last id it delivered and skips anything at or below
//! it, so the switch has neither gaps nor duplicates. A subscriber that falls too far behind the
//! broadcast (lagged) catches up from the database the same way.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, watch, OnceCell};
use tokio_util::sync::CancellationToken;

use super::changes::{score_changes_after, ScoreChangeRow};
use super::{FeedError, CHANNEL};
use crate::alerts::store::{alerts_after, AlertRow};
use crate::app::AppState;
use crate::db::{DbError, DbPool};

/// Rows read per query, both by the fan-out and by replaying subscribers.
const PAGE: i64 = 1000;
/// Events a slow subscriber may fall behind before it catches up from the database instead.
const BROADCAST_CAPACITY: usize = 4096;
/// The safety-net poll: a lost notification delays events by at most this much.
const DEFAULT_POLL: Duration = Duration::from_secs(3);

/// Something with a position in a durable feed.
pub trait FeedItem: Send + Sync + 'static {
    fn feed_id(&self) -> i64;
}

impl FeedItem for ScoreChangeRow {
    fn feed_id(&self) -> i64 {
        self.id
    }
}

impl FeedItem for AlertRow {
    fn feed_id(&self) -> i64 {
        self.id
    }
}

type FetchFn<T> = fn(DbPool, i64, i64) -> BoxFuture<'static, Result<Vec<T>, DbError>>;

fn fetch_score_changes(
    pool: DbPool,
    after: i64,
    limit: i64,
) -> BoxFuture<'static, Result<Vec<ScoreChangeRow>, DbError>> {
    async move { score_changes_after(&pool, after, limit).await }.boxed()
}

fn fetch_alerts(
    pool: DbPool,
    after: i64,
    limit: i64,
) -> BoxFuture<'static, Result<Vec<AlertRow>, DbError>> {
    async move { alerts_after(&pool, after, limit).await }.boxed()
}

/// One feed table's broadcast. `last` is the newest id broadcast; it is read and advanced under
/// the same lock as `subscribe`/`send`, so a new subscriber knows exactly where its receiver starts.
struct Channel<T> {
    tx: broadcast::Sender<Arc<T>>,
    last: Mutex<i64>,
    fetch: FetchFn<T>,
}

impl<T: FeedItem> Channel<T> {
    fn new(fetch: FetchFn<T>) -> Self {
        Channel {
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
            last: Mutex::new(0),
            fetch,
        }
    }

    fn last(&self) -> i64 {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn subscribe(&self) -> (broadcast::Receiver<Arc<T>>, i64) {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        (self.tx.subscribe(), *last)
    }

    /// Reads everything after the last broadcast id and broadcasts it; returns how many rows.
    async fn pump(&self, pool: &DbPool) -> Result<usize, DbError> {
        let mut total = 0;
        loop {
            let after = self.last();
            let rows = (self.fetch)(pool.clone(), after, PAGE).await?;
            let n = rows.len();
            {
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                for row in rows {
                    let id = row.feed_id();
                    if id <= *last {
                        continue;
                    }
                    *last = id;
                    // No receivers is fine: nobody is subscribed in this process right now.
                    let _ = self.tx.send(Arc::new(row));
                }
            }
            total += n;
            if (n as i64) < PAGE {
                return Ok(total);
            }
        }
    }
}

struct Inner {
    pool: DbPool,
    database_url: String,
    scores: Channel<ScoreChangeRow>,
    alerts: Channel<AlertRow>,
    started: OnceCell<()>,
    shutdown: CancellationToken,
    poll_interval: Duration,
    /// Bumped after each pump that found new rows: the webhook worker wakes on it.
    activity: watch::Sender<u64>,
}

/// Handle to this process's fan-out; cheap to clone.
#[derive(Clone)]
pub struct FeedHub {
    inner: Arc<Inner>,
}

static HUBS: OnceLock<Mutex<HashMap<String, FeedHub>>> = OnceLock::new();

impl FeedHub {
    /// A hub that is not started yet; it starts on the first subscription or [`FeedHub::start`].
    pub fn new(pool: DbPool, database_url: &str, shutdown: CancellationToken) -> FeedHub {
        FeedHub {
            inner: Arc::new(Inner {
                pool,
                database_url: database_url.to_string(),
                scores: Channel::new(fetch_score_changes),
                alerts: Channel::new(fetch_alerts),
                started: OnceCell::new(),
                shutdown,
                poll_interval: DEFAULT_POLL,
                activity: watch::channel(0).0,
            }),
        }
    }

    /// The process's hub for this state's database (one LISTEN connection per process and
    /// database, however many times it is asked for).
    pub fn shared(state: &AppState) -> FeedHub {
        let hubs = HUBS.get_or_init(Default::default);
        let mut hubs = hubs.lock().unwrap_or_else(|e| e.into_inner());
        hubs.entry(state.database_url.to_string())
            .or_insert_with(|| {
                FeedHub::new(
                    state.pool.clone(),
                    &state.database_url,
                    state.shutdown.clone(),
                )
            })
            .clone()
    }

    /// Starts the listener (idempotent): records the current end of each feed, then listens.
    pub async fn start(&self) -> Result<(), FeedError> {
        self.inner
            .started
            .get_or_try_init(|| async {
                let scores_end = super::latest_score_change_id(&self.inner.pool).await?;
                let alerts_end = crate::alerts::store::latest_alert_id(&self.inner.pool).await?;
                *self
                    .inner
                    .scores
                    .last
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = scores_end;
                *self
                    .inner
                    .alerts
                    .last
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = alerts_end;
                tokio::spawn(listen_loop(self.inner.clone()));
                Ok::<(), FeedError>(())
            })
            .await?;
        Ok(())
    }

    /// Wakes when the fan-out saw new rows (used by the webhook worker to deliver promptly).
    pub fn activity(&self) -> watch::Receiver<u64> {
        self.inner.activity.subscribe()
    }

    /// Score changes after `after` (replayed), then live ones, in id order, each once.
    /// Without `after`, only changes committed from now on.
    pub async fn score_changes(
        &self,
        after: Option<i64>,
        filter: impl Fn(&ScoreChangeRow) -> bool + Send + Sync + 'static,
    ) -> Result<
        impl Stream<Item = Result<Arc<ScoreChangeRow>, FeedError>> + Send + 'static,
        FeedError,
    > {
        self.start().await?;
        let (rx, end) = self.inner.scores.subscribe();
        Ok(subscriber_stream(
            self.inner.pool.clone(),
            self.inner.scores.fetch,
            rx,
            end,
            after,
            filter,
        ))
    }

    /// Alerts raised after `after` (replayed), then live ones, in id order, each once.
    pub async fn alerts(
        &self,
        after: Option<i64>,
        filter: impl Fn(&AlertRow) -> bool + Send + Sync + 'static,
    ) -> Result<impl Stream<Item = Result<Arc<AlertRow>, FeedError>> + Send + 'static, FeedError>
    {
        self.start().await?;
        let (rx, end) = self.inner.alerts.subscribe();
        Ok(subscriber_stream(
            self.inner.pool.clone(),
            self.inner.alerts.fetch,
            rx,
            end,
            after,
            filter,
        ))
    }

    /// Number of subscribers currently attached in this process.
    pub fn subscriber_count(&self) -> usize {
        self.inner.scores.tx.receiver_count() + self.inner.alerts.tx.receiver_count()
    }

    /// Reads and broadcasts new rows now (what a notification triggers).
    async fn pump(inner: &Inner) {
        let mut found = 0;
        for result in [
            inner.scores.pump(&inner.pool).await,
            inner.alerts.pump(&inner.pool).await,
        ] {
            match result {
                Ok(n) => found += n,
                Err(e) => {
                    tracing::warn!(error = %e, "feed fan-out could not read new events; retrying")
                }
            }
        }
        if found > 0 {
            inner.activity.send_modify(|n| *n = n.wrapping_add(1));
            metrics::counter!("healthd_feed_events_total").increment(found as u64);
        }
    }
}

/// Starts this process's fan-out (for `jobs.rs`) and returns the hub the subscription resolvers use.
pub fn spawn_fanout(state: &AppState) -> FeedHub {
    // Alert evaluation after scoring runs without the config at hand: give it this process's.
    if let Err(e) = crate::alerts::rules::install_file_config(&state.config.alerts) {
        tracing::error!(error = %e, "invalid [alerts] configuration; using the defaults");
    }
    let hub = FeedHub::shared(state);
    let starting = hub.clone();
    tokio::spawn(async move {
        // Retry until the database answers; subscriptions also start it on first use.
        let mut delay = Duration::from_millis(500);
        while let Err(e) = starting.start().await {
            tracing::warn!(error = %e, "feed fan-out cannot start yet");
            if starting.inner.shutdown.is_cancelled() {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    });
    hub
}

/// Owns the LISTEN connection; reconnects with back-off and polls while it is down.
async fn listen_loop(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        match listen(&inner.database_url).await {
            Ok((client, mut hints)) => {
                backoff = Duration::from_millis(250);
                tracing::debug!("feed fan-out listening on {CHANNEL}");
                // Anything committed while we were not listening.
                FeedHub::pump(&inner).await;
                let mut poll = tokio::time::interval(inner.poll_interval);
                poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => return,
                        hint = hints.recv() => {
                            if hint.is_none() {
                                tracing::warn!("feed LISTEN connection lost; reconnecting");
                                break;
                            }
                            // Coalesce a burst of hints into one read.
                            while hints.try_recv().is_ok() {}
                        }
                        _ = poll.tick() => {}
                    }
                    FeedHub::pump(&inner).await;
                }
                drop(client);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the feed LISTEN connection; polling until it works");
                FeedHub::pump(&inner).await;
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff =
                    (backoff * 2).min(Duration::from_secs(inner.poll_interval.as_secs().max(1)));
            }
        }
    }
}

/// Opens a dedicated connection, runs `LISTEN`, and forwards each notification as a unit hint.
/// The channel closes when the connection ends.
async fn listen(url: &str) -> Result<(tokio_postgres::Client, mpsc::Receiver<()>), FeedError> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    // Full means a wake-up is already pending: nothing is lost by dropping this one.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(()) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "feed LISTEN connection error");
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok((client, rx))
}

/// Replay-then-live state of one subscriber.
struct Cursor<T> {
    pool: DbPool,
    fetch: FetchFn<T>,
    rx: broadcast::Receiver<Arc<T>>,
    /// The last id delivered or skipped; nothing at or below it is delivered again.
    last: i64,
    catching_up: bool,
    pending: VecDeque<Arc<T>>,
    /// A replay query failed: the error was delivered and the stream ends.
    failed: bool,
}

fn subscriber_stream<T: FeedItem>(
    pool: DbPool,
    fetch: FetchFn<T>,
    rx: broadcast::Receiver<Arc<T>>,
    broadcast_end: i64,
    after: Option<i64>,
    filter: impl Fn(&T) -> bool + Send + Sync + 'static,
) -> impl Stream<Item = Result<Arc<T>, FeedError>> + Send + 'static {
    // With `after`, replay from the database up to where the receiver starts (and beyond:
    // duplicates are skipped by id). Without, start where the receiver starts.
    let (last, catching_up) = match after {
        Some(after) if after < broadcast_end => (after, true),
        Some(after) => (after, false),
        None => (broadcast_end, false),
    };
    let cursor = Cursor {
        pool,
        fetch,
        rx,
        last,
        catching_up,
        pending: VecDeque::new(),
        failed: false,
    };
    futures_util::stream::unfold((cursor, filter), |(mut cursor, filter)| async move {
        loop {
            if cursor.failed {
                return None;
            }
            if let Some(item) = cursor.pending.pop_front() {
                let id = item.feed_id();
                if id <= cursor.last {
                    continue;
                }
                cursor.last = id;
                if filter(&item) {
                    return Some((Ok(item), (cursor, filter)));
                }
                continue;
            }
            if cursor.catching_up {
                match (cursor.fetch)(cursor.pool.clone(), cursor.last, PAGE).await {
                    Ok(rows) => {
                        cursor.catching_up = rows.len() as i64 == PAGE;
                        cursor.pending.extend(rows.into_iter().map(Arc::new));
                        continue;
                    }
                    Err(e) => {
                        cursor.failed = true;
                        return Some((Err(FeedError::Db(e)), (cursor, filter)));
                    }
                }
            }
            match cursor.rx.recv().await {
                Ok(item) => cursor.pending.push_back(item),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::debug!(
                        skipped,
                        "subscriber lagged behind the broadcast; catching up from the database"
                    );
                    cursor.catching_up = true;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
