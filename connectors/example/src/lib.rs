//! # The example connector: copy me
//!
//! A complete, minimal healthd connector. It pretends to be a source system holding one
//! customer account with a few users, and reports one login per user for every hour that passed
//! since the last run. Copy this crate, rename it, and replace the "source system" parts with
//! calls to your API or database.
//!
//! The crate must be a `cdylib` (`[lib] crate-type = ["cdylib"]`; this one also builds an
//! `rlib` so its unit test can call it directly) and depend on `healthd-plugin-api`.
//!
//! Configure it in the healthd TOML config:
//!
//! ```toml
//! [[connector]]
//! name = "example"          # the instance name (what healthd stores as the data source)
//! plugin = "example"        # the manifest name below
//! schedule = "every 1h"
//! settings = { account_key = "example-co", users = 3 }
//! ```

use chrono::{DateTime, Duration, DurationRound, Utc};
use healthd_plugin_api::{
    export_connector, Account, Connector, ConnectorError, LogLevel, Manifest, Money, Record,
    RecordKind, SyncContext, UsageEvent,
};
use serde_json::{json, Value};

/// Step 1: a type holding what `new` learned from the settings (API clients, credentials...).
pub struct ExampleConnector {
    account_key: String,
    users: u32,
}

// Step 2: export it. This generates the `extern "C"` entry point healthd looks for; you never
// write unsafe code yourself. One connector per library.
export_connector!(ExampleConnector);

impl Connector for ExampleConnector {
    // Step 3: describe the connector. healthd reads this when it loads the library and shows it
    // in `healthd plugin inspect`. The settings schema is a small JSON-Schema subset (see
    // `healthd_plugin_api::settings`): healthd refuses settings that do not match it, fills in
    // the defaults, and only then calls `new`.
    fn manifest() -> Manifest {
        Manifest {
            name: "example".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description:
                "Example connector: one account, hourly logins (copy it to write your own)".into(),
            record_kinds: vec![RecordKind::Accounts, RecordKind::Usage],
            settings_schema: json!({
                "type": "object",
                "properties": {
                    "account_key": {"type": "string", "default": "example-co",
                                    "description": "Key of the account to report"},
                    "users": {"type": "integer", "default": 3, "minimum": 1, "maximum": 1000,
                              "description": "How many users log in every hour"}
                }
            }),
        }
    }

    // Step 4: build an instance from the validated settings. Check here what the schema cannot
    // express (does the folder exist? do the credentials work?) and return
    // `ConnectorError::Settings` with a message the user can act on.
    fn new(settings: Value) -> Result<Self, ConnectorError> {
        let account_key = settings["account_key"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        if account_key.is_empty() {
            return Err(ConnectorError::settings("`account_key` must not be empty"));
        }
        // Defaults are already filled in, so these reads cannot miss.
        let users = settings["users"].as_u64().unwrap_or(3) as u32;
        Ok(ExampleConnector { account_key, users })
    }

    // Step 5: one sync run. healthd calls it on a background thread, on the connector's
    // schedule, with the cursor saved by the last batch of the previous runs.
    fn sync(&mut self, ctx: &mut SyncContext<'_>) -> Result<(), ConnectorError> {
        // The cursor is yours: any text. Here: the last hour already reported (RFC 3339).
        // `None` means this is the first run ever: report the last 24 hours.
        let now = ctx.now(); // use the host's clock, not Utc::now(): tests can fix it
        let this_hour = now
            .duration_trunc(Duration::hours(1))
            .expect("hour truncation");
        let mut next_hour = match ctx.cursor() {
            None => this_hour - Duration::hours(24),
            Some(c) => {
                DateTime::parse_from_rfc3339(c)
                    .map_err(|e| ConnectorError::failed(format!("unreadable cursor {c:?}: {e}")))?
                    .with_timezone(&Utc)
                    + Duration::hours(1)
            }
        };

        // On the first run, describe the account itself. healthd creates it (or matches an
        // existing account with the same domain) before it stores the usage below.
        if ctx.cursor().is_none() {
            let account = Account {
                key: self.account_key.clone(),
                name: Some(format!("{} (example)", self.account_key)),
                domain: Some(format!("{}.example", self.account_key)),
                plan: Some("growth".into()),
                seats: Some(self.users as i32),
                mrr: Some(Money::from_cents(49_00 * i64::from(self.users))),
                ..Default::default()
            };
            // A batch without a cursor change: the cursor stays as it was.
            ctx.emit(vec![Record::Account(account)], None)?;
        }

        while next_hour <= this_hour {
            // Long loops should notice when healthd cancels the run (timeout, shutdown).
            ctx.check_cancelled()?;

            // "Fetch" the source's data for this hour...
            let records: Vec<Record> = (1..=self.users)
                .map(|u| {
                    Record::UsageEvent(UsageEvent {
                        account_key: self.account_key.clone(),
                        user_id: Some(format!("user{u}@{}.example", self.account_key)),
                        event: "login".into(),
                        feature: None,
                        occurred_at: next_hour + Duration::minutes(i64::from(u % 60)),
                        count: 1,
                        // A stable id makes re-sending the same event harmless.
                        event_id: Some(format!(
                            "{}-{u}-{}",
                            self.account_key,
                            next_hour.timestamp()
                        )),
                    })
                })
                .collect();

            // ...and hand it over with the cursor that is true once it is saved. healthd saves the
            // records and the cursor in one transaction, so if the process dies here the next run
            // starts from the last saved hour: nothing is lost or counted twice. Real connectors
            // send a few thousand records per batch, not one hour's worth.
            ctx.emit(records, Some(next_hour.to_rfc3339()))?;
            next_hour += Duration::hours(1);
        }

        // Source items that cannot be used are rejected, not fatal:
        // `ctx.reject(Some("file.csv"), Some(12), "unknown status `opn`")` records why, and the
        // run goes on. The log goes to the healthd server log, tagged with this connector.
        ctx.log(LogLevel::Debug, format!("reported up to {this_hour}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use healthd_plugin_api::testing::MemoryHost;

    // Step 6: test the connector in memory, with a fixed clock.
    #[test]
    fn reports_each_hour_once() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 26, 9, 30, 0).unwrap();
        let mut host = MemoryHost::at(t0);
        host.run::<ExampleConnector>(json!({"users": 2}), None)
            .unwrap();
        // One account, then 25 hours (09:00 yesterday ..= 09:00 today) x 2 users.
        assert_eq!(host.records().len(), 1 + 25 * 2);
        assert_eq!(host.cursor.as_deref(), Some("2026-11-26T09:00:00+00:00"));

        // Two hours later only the two new hours are reported.
        let mut later = MemoryHost::at(t0 + Duration::hours(2));
        later
            .run::<ExampleConnector>(json!({"users": 2}), host.cursor.as_deref())
            .unwrap();
        assert_eq!(later.records().len(), 2 * 2);

        let mut bad = MemoryHost::default();
        let err = bad
            .run::<ExampleConnector>(json!({"users": 0}), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid settings: setting `users` must be at least 1, got 0"
        );
    }
}
