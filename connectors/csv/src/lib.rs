//! # The `csv` connector
//!
//! Reads CSV files dropped in a folder (`dir` setting). Each file is ingested once; a changed file
//! (different content) is ingested again, which is harmless because every record is an upsert
//! or deduplicated.
//!
//! ## Files
//! UTF-8, comma-separated, RFC 4180 quoting, a header row; columns in any order, extra columns
//! ignored, an empty cell is "no value". Times are RFC 3339 (`2026-11-26T09:30:00Z`; a bare date
//! means midnight UTC), dates are `YYYY-MM-DD`. The file name prefix says what a file holds
//! (required columns in **bold**):
//!
//! | prefix | columns |
//! | --- | --- |
//! | `accounts` | **account_key**, name, domain, owner_email, plan, seats, mrr, renewal_date |
//! | `subscriptions` | **account_key**, **subscription_id**, **status** (trialing, active, past_due, unpaid, canceled), mrr, current_period_end, cancel_at_period_end (true/false) |
//! | `invoices` | **account_key**, **invoice_id**, **amount**, currency, **due_date**, paid_at, **status** (draft, open, paid, void, uncollectible) |
//! | `tickets` | **account_key**, **ticket_id**, subject, priority (low, normal, high, urgent), **status** (new, open, pending, solved, closed), **opened_at**, closed_at, csat (1-5) |
//! | `usage_events` | **account_key**, user_id, **event** (`login`, `page_view`, or a product action), feature, **occurred_at**, count (default 1), event_id |
//! | `churn` | **account_key**, **churned_at** |
//!
//! e.g. `usage_events-2026-11-23.csv`. Files are processed accounts first, then subscriptions,
//! invoices, tickets, usage events and churn, each group by file name, so accounts exist before
//! the facts about them. Other files are ignored (with a log line).
//!
//! ## Errors
//! A bad row (missing required value, unparsable time or number, unknown status, csat outside
//! 1-5) is rejected with the file name, its line number (the header is line 1) and the reason;
//! the rest of the file is ingested. Values over the limits of `healthd_plugin_api::limits`
//! reject their row the same way. A file missing a required column, or whose header names a
//! column twice, is rejected as a whole (one rejection, line 1).
//!
//! Line breaks inside a quoted value are kept only in the free-text columns `name` and
//! `subject` (and in columns the connector does not read), up to `MAX_TEXT_BYTES`. A quoted
//! value that runs past the end of its line anywhere else (or past that bound) is an
//! unterminated quote: the row is rejected at the line where the quote opened and reading
//! resumes at the next line, so the rows after it still ingest. At most [`MAX_REJECTIONS_PER_FILE`] rows per file are listed; a final
//! rejection counts the rest.
//!
//! ## Cursor
//! JSON: the name and SHA-256 of each completed file still in the folder, and the position
//! reached in the file being read, saved with every batch, so a run killed mid-file resumes
//! after the last saved batch without duplicates.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use healthd_plugin_api::{
    export_connector, limits, Account, Churn, Connector, ConnectorError, Invoice, LogLevel,
    Manifest, Money, Record, RecordKind, Subscription, SyncContext, Ticket, UsageEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Rows of one file listed individually as rejections; the rest are counted in one more.
pub const MAX_REJECTIONS_PER_FILE: u64 = 1000;

/// The CSV drop-folder connector.
pub struct CsvConnector {
    dir: PathBuf,
    batch_size: usize,
}

export_connector!(CsvConnector);

impl Connector for CsvConnector {
    fn manifest() -> Manifest {
        Manifest {
            name: "csv".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Reads accounts, usage, tickets, subscriptions, invoices and churn from CSV files in a folder".into(),
            record_kinds: RecordKind::ALL.to_vec(),
            settings_schema: json!({
                "type": "object",
                "properties": {
                    "dir": {"type": "string", "description": "The drop folder holding the CSV files"},
                    "batch_size": {"type": "integer", "default": 5000, "minimum": 1, "maximum": 100000,
                                   "description": "Records per batch (each batch is committed with the cursor)"}
                },
                "required": ["dir"]
            }),
        }
    }

    fn new(settings: Value) -> Result<Self, ConnectorError> {
        let dir = PathBuf::from(settings["dir"].as_str().unwrap_or_default());
        if !dir.is_dir() {
            return Err(ConnectorError::settings(format!(
                "`dir` {} is not a folder",
                dir.display()
            )));
        }
        let batch_size = settings["batch_size"].as_u64().unwrap_or(5000).max(1) as usize;
        Ok(CsvConnector { dir, batch_size })
    }

    fn sync(&mut self, ctx: &mut SyncContext<'_>) -> Result<(), ConnectorError> {
        let mut cursor: CursorState = match ctx.cursor() {
            None => CursorState::default(),
            Some(c) => serde_json::from_str(c).map_err(|e| {
                ConnectorError::failed(format!(
                    "the saved cursor is not a csv connector cursor ({e}); reset the connector's cursor"
                ))
            })?,
        };
        let files = self.list_files(ctx)?;
        // Forget files no longer in the folder so the cursor stays small.
        cursor
            .done
            .retain(|name, _| files.iter().any(|(_, n, _)| n == name));
        if cursor
            .partial
            .as_ref()
            .is_some_and(|p| !files.iter().any(|(_, n, _)| *n == p.file))
        {
            cursor.partial = None;
        }
        for (kind, name, path) in files {
            ctx.check_cancelled()?;
            let (size, modified) = fingerprint(&path)?;
            // Same size and modification time as when it was ingested: no need to read it.
            if let Some(done) = cursor.done.get(&name) {
                if done.size == size && done.modified == modified {
                    continue;
                }
            }
            let hash = sha256_file(&path)?;
            if let Some(done) = cursor.done.get_mut(&name) {
                if done.sha256 == hash {
                    // Touched but unchanged: remember the new time (saved with the next batch).
                    (done.size, done.modified) = (size, modified);
                    continue;
                }
            }
            let resume = cursor
                .partial
                .take()
                .filter(|p| p.file == name && p.hash == hash);
            FileRun {
                ctx: &mut *ctx,
                cursor: &mut cursor,
                kind,
                name,
                done: DoneFile {
                    sha256: hash,
                    size,
                    modified,
                },
                batch_size: self.batch_size,
            }
            .run(&path, resume)?;
        }
        Ok(())
    }
}

impl CsvConnector {
    /// The CSV files in the folder with their kind, in processing order.
    fn list_files(
        &self,
        ctx: &mut SyncContext<'_>,
    ) -> Result<Vec<(FileKind, String, PathBuf)>, ConnectorError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| {
            ConnectorError::failed(format!("cannot read {}: {e}", self.dir.display()))
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let lower = name.to_ascii_lowercase();
            if !lower.ends_with(".csv") || !entry.file_type()?.is_file() {
                continue;
            }
            match FileKind::from_file_name(&lower) {
                Some(kind) => files.push((kind, name, entry.path())),
                None => ctx.log(
                    LogLevel::Warn,
                    format!(
                        "ignoring {name}: the name does not start with a known prefix ({})",
                        FileKind::prefixes()
                    ),
                ),
            }
        }
        files.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(files)
    }
}

/// What the connector remembers between runs.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CursorState {
    /// Completed files by name.
    #[serde(default)]
    done: BTreeMap<String, DoneFile>,
    /// The file being read when the last batch was saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partial: Option<Partial>,
}

/// A file that was ingested completely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DoneFile {
    /// SHA-256 (hex) of the content that was ingested: a file with other content is read again.
    sha256: String,
    /// Size and modification time (ns since the epoch) then, to skip re-hashing unchanged files.
    size: u64,
    modified: u64,
}

/// A position inside a file: where the next unread record starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Partial {
    file: String,
    hash: String,
    byte: u64,
    line: u64,
    record: u64,
    /// Rejections already listed for this file (to keep the per-file cap across resumes).
    #[serde(default)]
    rejected: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FileKind {
    Accounts,
    Subscriptions,
    Invoices,
    Tickets,
    UsageEvents,
    Churn,
}

impl FileKind {
    const ALL: [FileKind; 6] = [
        FileKind::Accounts,
        FileKind::Subscriptions,
        FileKind::Invoices,
        FileKind::Tickets,
        FileKind::UsageEvents,
        FileKind::Churn,
    ];

    fn prefix(self) -> &'static str {
        match self {
            FileKind::Accounts => "accounts",
            FileKind::Subscriptions => "subscriptions",
            FileKind::Invoices => "invoices",
            FileKind::Tickets => "tickets",
            FileKind::UsageEvents => "usage_events",
            FileKind::Churn => "churn",
        }
    }

    fn prefixes() -> String {
        Self::ALL.map(FileKind::prefix).join(", ")
    }

    fn from_file_name(lower: &str) -> Option<FileKind> {
        Self::ALL
            .into_iter()
            .find(|k| lower.starts_with(k.prefix()))
    }

    fn required(self) -> &'static [&'static str] {
        match self {
            FileKind::Accounts => &["account_key"],
            FileKind::Subscriptions => &["account_key", "subscription_id", "status"],
            FileKind::Invoices => &["account_key", "invoice_id", "amount", "due_date", "status"],
            FileKind::Tickets => &["account_key", "ticket_id", "status", "opened_at"],
            FileKind::UsageEvents => &["account_key", "event", "occurred_at"],
            FileKind::Churn => &["account_key", "churned_at"],
        }
    }
}

/// Reading one file.
struct FileRun<'c, 'x> {
    ctx: &'c mut SyncContext<'x>,
    cursor: &'c mut CursorState,
    kind: FileKind,
    name: String,
    done: DoneFile,
    batch_size: usize,
}

impl FileRun<'_, '_> {
    fn run(self, path: &Path, resume: Option<Partial>) -> Result<(), ConnectorError> {
        let FileRun {
            ctx,
            cursor,
            kind,
            name,
            done,
            batch_size,
        } = self;
        let hash = done.sha256.clone();
        let file = File::open(path)
            .map_err(|e| ConnectorError::failed(format!("cannot open {name}: {e}")))?;
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(true)
            .from_reader(BufReader::with_capacity(1 << 16, file));
        let headers = reader
            .byte_headers()
            .map_err(|e| ConnectorError::failed(format!("cannot read {name}: {e}")))?
            .clone();
        let columns = match Columns::new(&headers) {
            Ok(c) => c,
            Err(twice) => {
                ctx.reject(
                    Some(&name),
                    Some(1),
                    format!("file skipped: the header names column `{twice}` more than once"),
                );
                cursor.done.insert(name, done);
                return ctx.emit(Vec::new(), Some(to_json(cursor)));
            }
        };
        let missing: Vec<&str> = kind
            .required()
            .iter()
            .copied()
            .filter(|c| !columns.has(c))
            .collect();
        if !missing.is_empty() {
            let list = missing
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let plural = if missing.len() == 1 {
                "column"
            } else {
                "columns"
            };
            ctx.reject(
                Some(&name),
                Some(1),
                format!("file skipped: missing required {plural} {list} in the header"),
            );
            cursor.done.insert(name, done);
            return ctx.emit(Vec::new(), Some(to_json(cursor)));
        }

        let mut rejected = 0u64;
        if let Some(p) = resume {
            let mut pos = csv::Position::new();
            pos.set_byte(p.byte).set_line(p.line).set_record(p.record);
            reader
                .seek(pos)
                .map_err(|e| ConnectorError::failed(format!("cannot resume {name}: {e}")))?;
            rejected = p.rejected;
            ctx.log(
                LogLevel::Info,
                format!("resuming {name} at line {}", p.line),
            );
        }

        let mut records = Vec::with_capacity(batch_size.min(10_000));
        let mut rows_in_batch = 0usize;
        let mut row = csv::ByteRecord::new();
        loop {
            let more = reader
                .read_byte_record(&mut row)
                .map_err(|e| ConnectorError::failed(format!("cannot read {name}: {e}")))?;
            if !more {
                break;
            }
            let line = row.position().map_or(0, |p| p.line());
            if let Some(reason) = runaway_quote(&columns, &row, reader.position().line() - line) {
                // Reject the row at the line the quote opened and read on from the next line.
                let start = row.position().cloned().unwrap_or_else(csv::Position::new);
                let next = next_line_start(path, start.byte())
                    .map_err(|e| ConnectorError::failed(format!("cannot read {name}: {e}")))?;
                let mut pos = csv::Position::new();
                pos.set_byte(next)
                    .set_line(line + 1)
                    .set_record(start.record() + 1);
                reader
                    .seek(pos)
                    .map_err(|e| ConnectorError::failed(format!("cannot read {name}: {e}")))?;
                rejected += 1;
                if rejected <= MAX_REJECTIONS_PER_FILE {
                    ctx.reject(Some(&name), Some(line), reason);
                }
                rows_in_batch += 1;
                continue;
            }
            match parse_row(kind, &columns, &row) {
                Ok(Some(record)) => records.push(record),
                Ok(None) => {} // a blank line
                Err(reason) => {
                    rejected += 1;
                    if rejected <= MAX_REJECTIONS_PER_FILE {
                        ctx.reject(Some(&name), Some(line), reason);
                    }
                }
            }
            rows_in_batch += 1;
            if rows_in_batch >= batch_size {
                ctx.check_cancelled()?;
                let next = reader.position();
                cursor.partial = Some(Partial {
                    file: name.clone(),
                    hash: hash.clone(),
                    byte: next.byte(),
                    line: next.line(),
                    record: next.record(),
                    rejected,
                });
                let batch =
                    std::mem::replace(&mut records, Vec::with_capacity(batch_size.min(10_000)));
                ctx.emit(batch, Some(to_json(cursor)))?;
                rows_in_batch = 0;
            }
        }
        if rejected > MAX_REJECTIONS_PER_FILE {
            ctx.reject(
                Some(&name),
                None,
                format!(
                    "{} more rows rejected (only the first {MAX_REJECTIONS_PER_FILE} are listed)",
                    rejected - MAX_REJECTIONS_PER_FILE
                ),
            );
        }
        cursor.partial = None;
        cursor.done.insert(name, done);
        ctx.emit(records, Some(to_json(cursor)))
    }
}

/// Why a record that spans `lines` lines is an unterminated quote rather than a quoted value
/// holding line breaks: the break is in a column that cannot hold one, or the value is longer
/// than any free text may be.
fn runaway_quote(columns: &Columns, row: &csv::ByteRecord, lines: u64) -> Option<String> {
    if lines <= 1 {
        return None;
    }
    row.iter().enumerate().find_map(|(i, v)| {
        if !v.contains(&b'\n') && !v.contains(&b'\r') {
            return None;
        }
        let why = if !columns.may_span_lines(i) {
            format!("{} cannot hold a line break", columns.name_of(i))
        } else if v.len() > limits::MAX_TEXT_BYTES {
            format!(
                "the value would be longer than {} bytes",
                limits::MAX_TEXT_BYTES
            )
        } else {
            return None;
        };
        Some(format!(
            "unterminated quote: the quoted value in {} starting on this line runs past the end of the line ({why}); reading resumes at the next line",
            columns.name_of(i)
        ))
    })
}

/// The byte offset of the line after the one starting at `byte` (the file's end if none).
fn next_line_start(path: &Path, byte: u64) -> std::io::Result<u64> {
    use std::io::{BufRead, Seek, SeekFrom};
    let mut f = BufReader::new(File::open(path)?);
    f.seek(SeekFrom::Start(byte))?;
    let mut skipped = Vec::new();
    let n = f.read_until(b'\n', &mut skipped)?;
    Ok(byte + n as u64)
}

fn to_json(cursor: &CursorState) -> String {
    serde_json::to_string(cursor).expect("cursor serializes")
}

fn fingerprint(path: &Path) -> Result<(u64, u64), ConnectorError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ConnectorError::failed(format!("cannot read {}: {e}", path.display())))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Ok((meta.len(), modified))
}

fn sha256_file(path: &Path) -> Result<String, ConnectorError> {
    let mut file = File::open(path)
        .map_err(|e| ConnectorError::failed(format!("cannot open {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Header name (trimmed, lower-case) -> column index.
struct Columns(HashMap<String, usize>);

/// Columns whose values may hold a line break (free text). In any other column a quoted value
/// that runs past the end of its line is an unterminated quote.
const MULTI_LINE_COLUMNS: [&str; 2] = ["name", "subject"];

/// Every column the connector reads, in any kind of file.
const READ_COLUMNS: [&str; 30] = [
    "account_key",
    "name",
    "domain",
    "owner_email",
    "plan",
    "seats",
    "mrr",
    "renewal_date",
    "subscription_id",
    "status",
    "current_period_end",
    "cancel_at_period_end",
    "invoice_id",
    "amount",
    "currency",
    "due_date",
    "paid_at",
    "ticket_id",
    "subject",
    "priority",
    "opened_at",
    "closed_at",
    "csat",
    "user_id",
    "event",
    "feature",
    "occurred_at",
    "count",
    "event_id",
    "churned_at",
];

impl Columns {
    /// The header's columns, or the name of a column it names twice (which one would win is
    /// a guess, so the file is refused).
    fn new(headers: &csv::ByteRecord) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (i, h) in headers.iter().enumerate() {
            let h = String::from_utf8_lossy(h);
            let h = h.trim_start_matches('\u{feff}').trim().to_ascii_lowercase();
            if h.is_empty() {
                continue;
            }
            if map.insert(h.clone(), i).is_some() {
                return Err(h);
            }
        }
        Ok(Columns(map))
    }

    /// Whether the value in column `index` may span lines: free-text columns, and columns this
    /// connector does not read (it never interprets them).
    fn may_span_lines(&self, index: usize) -> bool {
        match self.0.iter().find(|(_, i)| **i == index) {
            Some((name, _)) if READ_COLUMNS.contains(&name.as_str()) => {
                MULTI_LINE_COLUMNS.contains(&name.as_str())
            }
            _ => true,
        }
    }

    /// The name of column `index` as the header gives it.
    fn name_of(&self, index: usize) -> String {
        self.0.iter().find(|(_, i)| **i == index).map_or_else(
            || format!("column {}", index + 1),
            |(n, _)| format!("`{n}`"),
        )
    }

    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// Reads the cells of one row, collecting every problem.
struct Row<'a> {
    columns: &'a Columns,
    record: &'a csv::ByteRecord,
    errors: Vec<String>,
}

impl<'a> Row<'a> {
    /// The trimmed cell, `None` when the column is absent or the cell empty.
    fn opt(&mut self, col: &str) -> Option<&'a str> {
        let i = *self.columns.0.get(col)?;
        let record: &'a csv::ByteRecord = self.record;
        let raw = record.get(i)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Some(s.trim()).filter(|s| !s.is_empty()),
            Err(_) => {
                self.errors.push(format!("`{col}` is not valid UTF-8"));
                None
            }
        }
    }

    fn opt_string(&mut self, col: &str) -> Option<String> {
        self.opt(col).map(str::to_string)
    }

    fn req_string(&mut self, col: &str) -> String {
        match self.opt_string(col) {
            Some(s) => s,
            None => {
                self.errors.push(format!("missing required value `{col}`"));
                String::new()
            }
        }
    }

    /// Parses an optional cell with `parse`, which returns the reason on failure.
    fn opt_with<T>(
        &mut self,
        col: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let v = self.opt(col)?;
        match parse(v) {
            Ok(t) => Some(t),
            Err(reason) => {
                self.errors.push(format!("invalid {col} `{v}`: {reason}"));
                None
            }
        }
    }

    fn req_with<T>(
        &mut self,
        col: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        if self.opt(col).is_none() {
            self.errors.push(format!("missing required value `{col}`"));
            return None;
        }
        self.opt_with(col, parse)
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err("expected an RFC 3339 time such as 2026-11-26T09:30:00Z".into())
}

fn parse_date(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| "expected a date such as 2026-11-26".into())
}

fn parse_money(s: &str) -> Result<Money, String> {
    Money::parse(s).map_err(|_| "expected a decimal amount such as 1234.50".into())
}

fn parse_count(s: &str) -> Result<i32, String> {
    match s.parse::<i32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

fn parse_seats(s: &str) -> Result<i32, String> {
    match s.parse::<i32>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err("expected a whole number of at least 0".into()),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_csat(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(n @ 1..=5) => Ok(n),
        _ => Err("csat must be a whole number from 1 to 5".into()),
    }
}

fn parse_enum<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| e.to_string())
}

/// One data row -> a record, `Ok(None)` for a blank line, or the reasons it is refused.
fn parse_row(
    kind: FileKind,
    columns: &Columns,
    record: &csv::ByteRecord,
) -> Result<Option<Record>, String> {
    if record.iter().all(|c| c.iter().all(u8::is_ascii_whitespace)) {
        return Ok(None);
    }
    let mut r = Row {
        columns,
        record,
        errors: Vec::new(),
    };
    let account_key = r.req_string("account_key");
    let out = match kind {
        FileKind::Accounts => Record::Account(Account {
            key: account_key,
            name: r.opt_string("name"),
            domain: r.opt_string("domain"),
            owner_email: r.opt_string("owner_email"),
            plan: r.opt_string("plan"),
            seats: r.opt_with("seats", parse_seats),
            mrr: r.opt_with("mrr", parse_money),
            renewal_date: r.opt_with("renewal_date", parse_date),
        }),
        FileKind::UsageEvents => {
            let event = r.req_string("event");
            let occurred_at = r.req_with("occurred_at", parse_time);
            Record::UsageEvent(UsageEvent {
                account_key,
                user_id: r.opt_string("user_id"),
                event,
                feature: r.opt_string("feature"),
                occurred_at: occurred_at.unwrap_or_default(),
                count: r.opt_with("count", parse_count).unwrap_or(1),
                event_id: r.opt_string("event_id"),
            })
        }
        FileKind::Tickets => {
            let ticket_id = r.req_string("ticket_id");
            let status = r.req_with("status", parse_enum);
            let opened_at = r.req_with("opened_at", parse_time);
            Record::Ticket(Ticket {
                account_key,
                ticket_id,
                subject: r.opt_string("subject"),
                priority: r.opt_with("priority", parse_enum).unwrap_or_default(),
                status: status.unwrap_or(healthd_plugin_api::TicketStatus::New),
                opened_at: opened_at.unwrap_or_default(),
                closed_at: r.opt_with("closed_at", parse_time),
                csat: r.opt_with("csat", parse_csat),
            })
        }
        FileKind::Subscriptions => {
            let subscription_id = r.req_string("subscription_id");
            let status = r.req_with("status", parse_enum);
            Record::Subscription(Subscription {
                account_key,
                subscription_id,
                status: status.unwrap_or(healthd_plugin_api::SubscriptionStatus::Active),
                mrr: r.opt_with("mrr", parse_money),
                current_period_end: r.opt_with("current_period_end", parse_time),
                cancel_at_period_end: r
                    .opt_with("cancel_at_period_end", parse_bool)
                    .unwrap_or(false),
            })
        }
        FileKind::Invoices => {
            let invoice_id = r.req_string("invoice_id");
            let amount = r.req_with("amount", parse_money);
            let due_date = r.req_with("due_date", parse_date);
            let status = r.req_with("status", parse_enum);
            Record::Invoice(Invoice {
                account_key,
                invoice_id,
                amount: amount.unwrap_or_else(|| Money::from_cents(0)),
                currency: r.opt_string("currency").map(|c| c.to_ascii_uppercase()),
                due_date: due_date.unwrap_or_default(),
                paid_at: r.opt_with("paid_at", parse_time),
                status: status.unwrap_or(healthd_plugin_api::InvoiceStatus::Open),
            })
        }
        FileKind::Churn => {
            let churned_at = r.req_with("churned_at", parse_time);
            Record::Churn(Churn {
                account_key,
                churned_at: churned_at.unwrap_or_default(),
            })
        }
    };
    if r.errors.is_empty() {
        r.errors = limits::violations(&out);
    }
    if r.errors.is_empty() {
        Ok(Some(out))
    } else {
        Err(r.errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use healthd_plugin_api::testing::MemoryHost;

    fn write(dir: &Path, name: &str, content: &str) {
        std::fs::write(dir.join(name), content).unwrap();
    }

    fn run(dir: &Path, cursor: Option<&str>, batch_size: u64) -> MemoryHost {
        let mut host = MemoryHost::default();
        host.run::<CsvConnector>(json!({"dir": dir, "batch_size": batch_size}), cursor)
            .unwrap();
        host
    }

    #[test]
    fn files_are_read_in_dependency_order_with_rejections() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            d,
            "usage_events-2026-11-23.csv",
            "occurred_at,account_key,event,extra\n\
             2026-11-23T10:00:00Z,acme,login,x\n\
             not-a-time,acme,login,x\n\
             2026-11-23T11:00:00Z,,page_view,x\n\
             \"2026-11-23T12:00:00Z\",acme,multi,\"two\nlines\"\n\
             2026-11-23T13:00:00+01:00,acme,report,x\n",
        );
        write(
            d,
            "accounts.csv",
            "\u{feff}Account_Key,Name,MRR,renewal_date,seats\nacme,Acme Inc,1200.50,2027-01-31,12\nbeta,Beta,12;5,,\n",
        );
        write(
            d,
            "tickets.csv",
            "account_key,ticket_id,status,opened_at,csat\nacme,T1,opn,2026-11-01T00:00:00Z,9\n",
        );
        write(d, "churn.csv", "account_key\nacme\n");
        write(d, "notes.csv", "whatever\n");
        let host = run(d, None, 5000);
        let kinds: Vec<&str> = host
            .records()
            .iter()
            .map(|r| match r {
                Record::Account(_) => "account",
                Record::UsageEvent(_) => "usage",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["account", "usage", "usage", "usage"]);
        let rej: Vec<(String, Option<u64>, String)> = host
            .rejections()
            .iter()
            .map(|r| (r.file.clone().unwrap(), r.line, r.reason.clone()))
            .collect();
        assert_eq!(
            rej,
            vec![
                ("accounts.csv".into(), Some(3), "invalid mrr `12;5`: expected a decimal amount such as 1234.50".into()),
                (
                    "tickets.csv".into(),
                    Some(2),
                    "invalid status `opn`: unknown ticket status `opn` (expected one of new, open, pending, solved, closed); invalid csat `9`: csat must be a whole number from 1 to 5".into()
                ),
                (
                    "usage_events-2026-11-23.csv".into(),
                    Some(3),
                    "invalid occurred_at `not-a-time`: expected an RFC 3339 time such as 2026-11-26T09:30:00Z".into()
                ),
                ("usage_events-2026-11-23.csv".into(), Some(4), "missing required value `account_key`".into()),
                ("churn.csv".into(), Some(1), "file skipped: missing required column `churned_at` in the header".into()),
            ]
        );
        let Record::UsageEvent(multi) = host.records()[2] else {
            panic!()
        };
        assert_eq!(multi.event, "multi");
        let Record::UsageEvent(last) = host.records()[3] else {
            panic!()
        };
        assert_eq!(
            last.occurred_at,
            parse_time("2026-11-23T12:00:00Z").unwrap()
        );
        assert!(host
            .logs
            .iter()
            .any(|(_, m)| m.contains("ignoring notes.csv")));

        // Nothing new: nothing emitted.
        let again = run(d, host.cursor.as_deref(), 5000);
        assert!(again.records().is_empty() && again.rejections().is_empty());
        assert_eq!(again.cursor, None);

        // A changed file is read again; unchanged ones are not.
        write(d, "churn.csv", "account_key,churned_at\nacme,2026-11-20\n");
        let third = run(d, host.cursor.as_deref(), 5000);
        assert_eq!(third.records().len(), 1);
        assert!(matches!(third.records()[0], Record::Churn(_)));

        // Rewritten with the same content: not ingested again.
        let accounts = std::fs::read(d.join("accounts.csv")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(d.join("accounts.csv"), accounts).unwrap();
        let fourth = run(d, third.cursor.as_deref(), 5000);
        assert!(fourth.records().is_empty() && fourth.rejections().is_empty());
    }

    #[test]
    fn a_killed_run_resumes_mid_file_without_duplicates() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut content = String::from("account_key,event,occurred_at,user_id,note\n");
        for i in 0..25 {
            if i == 7 {
                content.push_str("a,login,bad,u,x\n");
            } else {
                content.push_str(&format!(
                    "a,login,2026-11-23T10:{i:02}:00Z,u{i},\"two\nlines\"\n"
                ));
            }
        }
        write(d, "usage_events.csv", &content);
        let full = run(d, None, 10);
        assert_eq!(full.records().len(), 24);
        assert_eq!(full.rejections()[0].line, Some(16)); // 1 header + 7 two-line rows before it

        // Simulate a run that died after its first batch was saved.
        let after_first = full.batches[0].cursor.clone().unwrap();
        let resumed = run(d, Some(&after_first), 10);
        let mut combined: Vec<Record> = full.batches[0].records.clone();
        combined.extend(resumed.records().into_iter().cloned());
        assert_eq!(
            combined,
            full.records().into_iter().cloned().collect::<Vec<_>>()
        );
        assert_eq!(
            resumed.rejections().len(),
            full.rejections().len() - full.batches[0].rejections.len()
        );
    }

    fn rejected(host: &MemoryHost) -> Vec<(String, Option<u64>, String)> {
        host.rejections()
            .iter()
            .map(|r| (r.file.clone().unwrap_or_default(), r.line, r.reason.clone()))
            .collect()
    }

    #[test]
    fn an_unterminated_quote_is_reported_at_its_line_and_reading_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut content =
            String::from("account_key,user_id,event,feature,occurred_at,count,event_id\n");
        content.push_str("acct-01,u1,\"login,,2026-11-20T10:00:00Z,1,oq-b1\n");
        for i in 0..5 {
            content.push_str(&format!(
                "acct-01,u1,login,,2026-11-20T1{i}:00:00Z,1,ok-{i}\n"
            ));
        }
        write(d, "usage_events.csv", &content);
        // A ticket subject may hold line breaks, up to the free-text limit.
        let long = "x".repeat(limits::MAX_TEXT_BYTES);
        write(
            d,
            "tickets.csv",
            &format!(
                "account_key,ticket_id,subject,status,opened_at\n\
                 a,t1,\"two\nlines\",open,2026-11-01\n\
                 a,t2,\"{long},open,2026-11-01\n\
                 a,t3,fine,open,2026-11-01\n"
            ),
        );
        for batch_size in [2, 5000] {
            let host = run(d, None, batch_size);
            let ids: Vec<String> = host
                .records()
                .iter()
                .map(|r| match r {
                    Record::UsageEvent(e) => e.event_id.clone().unwrap(),
                    Record::Ticket(t) => t.ticket_id.clone(),
                    _ => panic!(),
                })
                .collect();
            assert_eq!(ids, ["t1", "t3", "ok-0", "ok-1", "ok-2", "ok-3", "ok-4"]);
            assert_eq!(
                rejected(&host),
                [
                    ("tickets.csv".to_string(), Some(4), format!("unterminated quote: the quoted value in `subject` starting on this line runs past the end of the line (the value would be longer than {} bytes); reading resumes at the next line", limits::MAX_TEXT_BYTES)),
                    ("usage_events.csv".to_string(), Some(2), "unterminated quote: the quoted value in `event` starting on this line runs past the end of the line (`event` cannot hold a line break); reading resumes at the next line".to_string()),
                ]
            );
        }
    }

    #[test]
    fn a_header_naming_a_column_twice_rejects_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "accounts.csv", "account_key,name,Account_Key\na,A,b\n");
        let host = run(d, None, 5000);
        assert!(host.records().is_empty());
        assert_eq!(
            rejected(&host),
            [(
                "accounts.csv".to_string(),
                Some(1),
                "file skipped: the header names column `account_key` more than once".to_string()
            )]
        );
    }

    #[test]
    fn values_over_the_limits_reject_their_row_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            d,
            "usage_events.csv",
            &format!(
                "account_key,event,occurred_at,event_id\n\
                 a,{},2026-11-20,e1\n\
                 a,login,0001-01-01,e2\n\
                 a,login,2026-11-20,e3\n",
                "e".repeat(600)
            ),
        );
        let host = run(d, None, 5000);
        assert_eq!(host.records().len(), 2);
        assert_eq!(
            rejected(&host),
            [(
                "usage_events.csv".to_string(),
                Some(2),
                "`event` is 600 bytes long; at most 512 are allowed".to_string()
            )]
        );
    }

    #[test]
    fn settings_are_checked() {
        let mut host = MemoryHost::default();
        let err = host
            .run::<CsvConnector>(json!({"dir": "/definitely/not/here"}), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid settings: `dir` /definitely/not/here is not a folder"
        );
        let err = host.run::<CsvConnector>(json!({}), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid settings: missing required setting `dir`"
        );
    }

    #[test]
    fn every_kind_parses() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "subscriptions.csv", "account_key,subscription_id,status,mrr,current_period_end,cancel_at_period_end\na,s1,past_due,99,2026-12-01T00:00:00Z,TRUE\n");
        write(d, "invoices.csv", "account_key,invoice_id,amount,currency,due_date,paid_at,status\na,i1,99.00,eur,2026-11-01,,open\n");
        write(d, "tickets.csv", "account_key,ticket_id,subject,priority,status,opened_at,closed_at,csat\na,t1,\"Help, please\",Urgent,solved,2026-11-01T00:00:00Z,2026-11-02T00:00:00Z,5\n");
        let host = run(d, None, 5000);
        assert!(host.rejections().is_empty(), "{:?}", host.rejections());
        let recs = host.records();
        let Record::Subscription(s) = recs[0] else {
            panic!()
        };
        assert!(
            s.cancel_at_period_end && s.status == healthd_plugin_api::SubscriptionStatus::PastDue
        );
        let Record::Invoice(i) = recs[1] else {
            panic!()
        };
        assert_eq!(
            (i.currency.as_deref(), i.amount.as_str()),
            (Some("EUR"), "99.00")
        );
        let Record::Ticket(t) = recs[2] else { panic!() };
        assert_eq!(t.subject.as_deref(), Some("Help, please"));
        assert_eq!(
            (t.priority, t.csat),
            (healthd_plugin_api::Priority::Urgent, Some(5))
        );
    }
}
