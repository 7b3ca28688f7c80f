//! The connector plugin boundary, with the real built libraries: the workspace connectors
//! (csv, synthetic, example) and deliberately broken fixtures in tests/fixtures/bad-plugins.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use healthd::plugins::{
    inspect, run_sync_with_timeout, Batch, CancelToken, Clock, LoadedPlugin, PluginError,
    PluginRegistry, Record, RecordKind,
};
use serde_json::json;

#[path = "support/plugin_libs.rs"]
#[allow(dead_code)]
mod plugin_libs;

use plugin_libs::{profile_dir, workspace_dir};

fn cargo(args: &[&str], target_dir: Option<&Path>) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_dir());
    if let Some(t) = target_dir {
        cmd.env("CARGO_TARGET_DIR", t);
    }
    if profile_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "cargo {args:?} failed");
}

/// The newest modification time of the files under `paths`.
fn newest_source(paths: &[PathBuf]) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if let Ok(m) = meta.modified() {
            newest = newest.max(m);
        }
    }
    newest
}

/// Whether every library exists and is newer than the sources of the crates it is built from
/// (`src/` and `Cargo.toml`, plus plugin-api's): then there is no need to run cargo, which may
/// wait for a build lock held by another cargo.
fn up_to_date(libs: &[PathBuf], crates: &[PathBuf]) -> bool {
    let mut sources = Vec::new();
    for dir in crates.iter().chain([&workspace_dir().join("plugin-api")]) {
        sources.push(dir.join("src"));
        sources.push(dir.join("Cargo.toml"));
    }
    let newest = newest_source(&sources);
    libs.iter().all(|l| {
        std::fs::metadata(l)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= newest)
    })
}

/// The connector libraries, built (or brought up to date) once per test process, so
/// `cargo test -p healthd --test plugins` works on its own.
fn connectors_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let names = ["csv", "synthetic", "example"];
        let libs: Vec<PathBuf> = names
            .iter()
            .map(|n| profile_dir().join(lib_name(&format!("healthd_connector_{n}"))))
            .collect();
        let crates: Vec<PathBuf> = names
            .iter()
            .map(|n| workspace_dir().join("connectors").join(n))
            .collect();
        if up_to_date(&libs, &crates) {
            return profile_dir();
        }
        cargo(
            &[
                "build",
                "--quiet",
                "-p",
                "healthd-connector-csv",
                "-p",
                "healthd-connector-synthetic",
                "-p",
                "healthd-connector-example",
            ],
            None,
        );
        profile_dir()
    })
}

/// The broken fixture plugins, built once per test process into target/fixtures.
fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = workspace_dir().join("target").join("fixtures");
        let out = target.join(profile_dir().file_name().unwrap());
        let names = [
            "panicking",
            "hanging",
            "wrong_api",
            "old_abi",
            "not_a_connector",
        ];
        let libs: Vec<PathBuf> = names
            .iter()
            .map(|n| out.join(lib_name(&format!("fixture_{n}"))))
            .collect();
        let crates: Vec<PathBuf> = names
            .iter()
            .map(|n| {
                workspace_dir()
                    .join("tests/fixtures/bad-plugins")
                    .join(n.replace('_', "-"))
            })
            .collect();
        if up_to_date(&libs, &crates) {
            return out;
        }
        cargo(
            &[
                "build",
                "--quiet",
                "--manifest-path",
                "tests/fixtures/bad-plugins/Cargo.toml",
            ],
            Some(&target),
        );
        target.join(profile_dir().file_name().unwrap())
    })
}

fn lib_name(stem: &str) -> String {
    plugin_libs::lib_path(Path::new(""), stem)
        .to_string_lossy()
        .into_owned()
}

fn connector(name: &str) -> LoadedPlugin {
    let path = connectors_dir().join(lib_name(&format!("healthd_connector_{name}")));
    LoadedPlugin::open(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn fixture_path(name: &str) -> PathBuf {
    fixtures_dir().join(lib_name(&format!("fixture_{name}")))
}

/// A sink that keeps every batch.
#[derive(Default, Clone)]
struct Collect(Arc<Mutex<Vec<Batch>>>);

impl Collect {
    fn sink(&self) -> impl FnMut(Batch) -> Result<(), String> + Send + 'static {
        let inner = Arc::clone(&self.0);
        move |b| {
            inner.lock().unwrap().push(b);
            Ok(())
        }
    }
    fn batches(&self) -> Vec<Batch> {
        self.0.lock().unwrap().clone()
    }
    fn records(&self) -> Vec<Record> {
        self.batches().into_iter().flat_map(|b| b.records).collect()
    }
}

fn fixed(s: &str) -> Clock {
    Clock::Fixed(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
}

#[test]
fn the_built_connectors_are_discovered_with_their_manifests() {
    let registry = PluginRegistry::discover(&[connectors_dir().to_path_buf()]);
    let names: Vec<String> = registry.list().into_iter().map(|p| p.name).collect();
    for expected in ["csv", "example", "synthetic"] {
        assert!(
            names.contains(&expected.to_string()),
            "{names:?} refused: {:?}",
            registry.refused()
        );
    }
    let csv = registry.get("csv").unwrap();
    assert_eq!(csv.manifest().record_kinds, RecordKind::ALL.to_vec());
    assert_eq!(csv.manifest().settings_schema["required"], json!(["dir"]));
    assert!(registry.get("nope").is_none());

    let info = inspect(csv.path()).unwrap();
    assert_eq!(info["abi_version"], 1);
    assert_eq!(info["manifest"]["name"], "csv");
    assert_eq!(info["plugin_api_version"], healthd_plugin_api::API_VERSION);
}

#[test]
fn csv_ingests_good_rows_rejects_bad_ones_and_resumes_from_its_cursor() {
    let plugin = connector("csv");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("accounts.csv"),
        "account_key,name,domain,mrr\nacme,Acme,acme.com,100.00\nglobex,Globex,globex.com,lots\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("usage_events-2026-11-23.csv"),
        "account_key,user_id,event,occurred_at\n\
         acme,u1,login,2026-11-23T09:00:00Z\n\
         acme,u1,\"page_view\",2026-11-23T09:01:00Z\n\
         acme,u2,login,yesterday\n\
         acme,u2,login,2026-11-23T09:02:00Z\n",
    )
    .unwrap();
    let settings = json!({"dir": dir.path()});
    let collect = Collect::default();
    let mut sink = collect.sink();
    let outcome = plugin
        .run_sync(&settings, None, &mut sink, &CancelToken::new())
        .unwrap();

    assert_eq!(outcome.records, 4);
    assert_eq!(outcome.rejections, 2);
    assert_eq!(
        outcome.record_kinds.iter().copied().collect::<Vec<_>>(),
        [RecordKind::Accounts, RecordKind::Usage]
    );
    let rejections: Vec<(String, Option<u64>, String)> = collect
        .batches()
        .into_iter()
        .flat_map(|b| b.rejections)
        .map(|r| (r.file.unwrap(), r.line, r.reason))
        .collect();
    assert_eq!(
        rejections,
        [
            ("accounts.csv".to_string(), Some(3), "invalid mrr `lots`: expected a decimal amount such as 1234.50".to_string()),
            (
                "usage_events-2026-11-23.csv".to_string(),
                Some(4), // a quoted value is read as one field (line breaks only where a column may hold them)
                "invalid occurred_at `yesterday`: expected an RFC 3339 time such as 2026-11-26T09:30:00Z".to_string()
            ),
        ]
    );
    let records = collect.records();
    assert!(
        matches!(&records[0], Record::Account(a) if a.key == "acme" && a.domain.as_deref() == Some("acme.com"))
    );
    assert_eq!(
        outcome.cursor.as_deref(),
        collect.batches().last().unwrap().cursor.as_deref()
    );

    // The next run with the saved cursor has nothing to do.
    let again = Collect::default();
    let mut sink = again.sink();
    let second = plugin
        .run_sync(
            &settings,
            outcome.cursor.as_deref(),
            &mut sink,
            &CancelToken::new(),
        )
        .unwrap();
    assert_eq!((second.batches, second.records), (0, 0));
    assert_eq!(second.cursor, outcome.cursor);
}

#[test]
fn settings_are_validated_before_the_connector_is_created() {
    let plugin = connector("csv");
    let mut sink = |_: Batch| Ok::<(), String>(());
    let err = plugin
        .run_sync(
            &json!({"dri": "/tmp"}),
            None,
            &mut sink,
            &CancelToken::new(),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid settings for plugin `csv`: unknown setting `dri` (known: batch_size, dir); missing required setting `dir`"
    );
    assert_eq!(
        plugin.validate_settings(&json!({"dir": "/x"})).unwrap(),
        json!({"dir": "/x", "batch_size": 5000})
    );
    // What the schema cannot say, the connector does.
    let err = plugin
        .run_sync(
            &json!({"dir": "/no/such/dir"}),
            None,
            &mut sink,
            &CancelToken::new(),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "connector `csv` could not start: invalid settings: `dir` /no/such/dir is not a folder"
    );
}

#[test]
fn synthetic_is_deterministic_across_the_boundary() {
    let plugin = connector("synthetic");
    let settings = json!({"accounts": 15, "days": 20, "batch_size": 500});
    let run = || {
        let c = Collect::default();
        let mut sink = c.sink();
        let outcome = plugin
            .run_sync_with_clock(
                &settings,
                None,
                &mut sink,
                &CancelToken::new(),
                fixed("2026-11-26T10:00:00Z"),
            )
            .unwrap();
        (outcome, c.batches())
    };
    let (first, batches_a) = run();
    let (second, batches_b) = run();
    assert_eq!(first, second);
    assert_eq!(batches_a, batches_b);
    assert!(first.records > 1000, "{first:?}");
    for kind in [
        RecordKind::Accounts,
        RecordKind::Usage,
        RecordKind::Support,
        RecordKind::Billing,
    ] {
        assert!(first.record_kinds.contains(&kind), "{first:?}");
    }
}

#[test]
fn a_failing_sink_stops_the_run_and_no_later_batch_is_saved() {
    let plugin = connector("synthetic");
    let calls = Arc::new(Mutex::new(0));
    let seen = Arc::clone(&calls);
    let mut sink = move |_: Batch| {
        let mut n = seen.lock().unwrap();
        *n += 1;
        if *n == 2 {
            Err("database is down".to_string())
        } else {
            Ok(())
        }
    };
    let err = plugin
        .run_sync(
            &json!({"accounts": 5, "days": 3, "batch_size": 50}),
            None,
            &mut sink,
            &CancelToken::new(),
        )
        .unwrap_err();
    assert!(matches!(err, PluginError::Sink { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "saving a batch from connector `synthetic` failed: database is down"
    );
    assert_eq!(*calls.lock().unwrap(), 2);
}

#[test]
fn a_panicking_connector_fails_its_run_and_the_process_lives_on() {
    let plugin = LoadedPlugin::open(fixture_path("panicking")).unwrap();
    let c = Collect::default();
    let mut sink = c.sink();
    for _ in 0..2 {
        let err = plugin
            .run_sync(&json!({}), None, &mut sink, &CancelToken::new())
            .unwrap_err();
        assert!(err.is_panic(), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "connector `panicking` failed: connector panicked: index out of bounds"
            ),
            "{msg}"
        );
    }
    // The batch emitted before the panic was delivered (and would be committed).
    assert_eq!(c.batches().len(), 2);

    let err = plugin
        .run_sync(
            &json!({"panic_in": "new"}),
            None,
            &mut sink,
            &CancelToken::new(),
        )
        .unwrap_err();
    assert!(err.is_panic());
    assert_eq!(
        err.to_string(),
        "connector `panicking` could not start: connector panicked: boom in new"
    );
}

#[test]
fn a_cancelled_run_stops_at_its_deadline() {
    let plugin = LoadedPlugin::open(fixture_path("hanging")).unwrap();
    let c = Collect::default();
    let mut sink = c.sink();
    let started = Instant::now();
    let token = CancelToken::new().with_timeout(Duration::from_millis(300));
    let err = plugin
        .run_sync(&json!({}), None, &mut sink, &token)
        .unwrap_err();
    assert!(matches!(err, PluginError::Cancelled { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        !c.batches().is_empty(),
        "batches before the deadline are delivered"
    );

    // Cancelling from another thread works the same way.
    let token = CancelToken::new();
    let remote = token.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        remote.cancel();
    });
    let err = plugin
        .run_sync(&json!({}), None, &mut sink, &token)
        .unwrap_err();
    assert!(matches!(err, PluginError::Cancelled { .. }), "{err:?}");
}

#[tokio::test]
async fn a_connector_that_ignores_cancellation_is_abandoned_after_the_grace_period() {
    let plugin = Arc::new(LoadedPlugin::open(fixture_path("hanging")).unwrap());
    let started = Instant::now();
    let err = run_sync_with_timeout(
        Arc::clone(&plugin),
        json!({"mode": "stuck", "stuck_ms": 3000}),
        None,
        |_: Batch| Ok::<(), String>(()),
        CancelToken::new(),
        Duration::from_millis(100),
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PluginError::TimedOut { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A cooperative one is cancelled at the timeout and reports it.
    let err = run_sync_with_timeout(
        plugin,
        json!({}),
        None,
        |_: Batch| Ok::<(), String>(()),
        CancelToken::new(),
        Duration::from_millis(100),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PluginError::Cancelled { .. }), "{err:?}");
}

#[test]
fn libraries_that_are_not_compatible_connectors_are_refused_clearly() {
    let err = LoadedPlugin::open(fixture_path("wrong_api"))
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with(&format!(
            "was built against plugin-api 0.999, this healthd speaks {0}.{1}: rebuild the connector against plugin-api {0}.{1}",
            healthd_plugin_api::API_VERSION_MAJOR,
            healthd_plugin_api::API_VERSION_MINOR
        )),
        "{err}"
    );

    let err = LoadedPlugin::open(fixture_path("old_abi"))
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with(
            "speaks connector ABI 7 (built against plugin-api 3.0), this healthd speaks ABI 1"
        ),
        "{err}"
    );

    let err = LoadedPlugin::open(fixture_path("not_a_connector"))
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("is not a healthd connector (no symbol `healthd_connector_v1`)"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("libx.so");
    std::fs::write(
        &garbage,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let err = LoadedPlugin::open(&garbage).unwrap_err();
    assert!(matches!(err, PluginError::Load { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot load {}: ", garbage.display())),
        "{err}"
    );

    let err = inspect(dir.path().join("libmissing.so")).unwrap_err();
    assert!(matches!(err, PluginError::Load { .. }), "{err:?}");
}

#[test]
fn discovery_skips_what_it_cannot_load_and_keeps_the_first_of_duplicate_names() {
    let dir = tempfile::tempdir().unwrap();
    let csv = connectors_dir().join(lib_name("healthd_connector_csv"));
    std::fs::copy(&csv, dir.path().join("liba_csv.so")).unwrap();
    std::fs::copy(&csv, dir.path().join("libb_csv_again.so")).unwrap();
    std::fs::copy(
        fixture_path("panicking"),
        dir.path().join("libpanicking.so"),
    )
    .unwrap();
    std::fs::copy(
        fixture_path("wrong_api"),
        dir.path().join("libwrong_api.so"),
    )
    .unwrap();
    std::fs::write(dir.path().join("libgarbage.so"), b"not an ELF file").unwrap();
    std::fs::write(dir.path().join("README.txt"), b"ignored").unwrap();

    let registry =
        PluginRegistry::discover(&[dir.path().to_path_buf(), dir.path().join("missing")]);
    let names: Vec<String> = registry.list().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["csv", "panicking"]);
    assert_eq!(
        registry.get("csv").unwrap().path(),
        dir.path().join("liba_csv.so")
    );
    let refused: Vec<(String, String)> = registry
        .refused()
        .into_iter()
        .map(|(p, why)| (p.file_name().unwrap().to_string_lossy().into_owned(), why))
        .collect();
    let files: Vec<&str> = refused.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        files,
        ["libb_csv_again.so", "libgarbage.so", "libwrong_api.so"]
    );
    assert!(
        refused[0]
            .1
            .starts_with("duplicate plugin name `csv`: already loaded from "),
        "{refused:?}"
    );
    assert!(refused[1].1.contains("cannot load"), "{refused:?}");
    assert!(
        refused[2].1.contains("built against plugin-api 0.999"),
        "{refused:?}"
    );
}
