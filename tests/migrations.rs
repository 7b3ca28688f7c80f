//! Upgrading a database that holds scores written by earlier versions: nothing is lost. The test
//! reverts the storage migrations of the scoring write path on a migrated database, writes rows the
//! way the earlier version did (verbose `jsonb` breakdowns in `health_current`, drivers stored with
//! each feed row), migrates forward again and reads everything back through the read API.

use diesel::sql_types::BigInt;
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use diesel_migrations::MigrationHarness;
use healthd::testing::TestDb;

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn scores_written_before_the_compact_breakdown_survive_the_upgrade() {
    let db = TestDb::new().await;
    let url = db.url().to_string();
    let reverted = tokio::task::spawn_blocking(move || {
        use diesel::Connection;
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        let mut names = Vec::new();
        for _ in 0..2 {
            let v = conn.revert_last_migration(healthd::db::MIGRATIONS).unwrap();
            names.push(v.to_string());
        }
        names
    })
    .await
    .unwrap();
    assert!(
        reverted[0].contains("000061") && reverted[1].contains("000060"),
        "{reverted:?}"
    );

    // Rows as the earlier version wrote them.
    let old = healthd::db::connect(db.url(), 2).await.unwrap();
    let mut conn = old.get().await.unwrap();
    let id: Id =
        diesel::sql_query("INSERT INTO accounts (key, name) VALUES ('old', 'Old Co') RETURNING id")
            .get_result(&mut conn)
            .await
            .unwrap();
    let id = id.id;
    let signals = r#"[{"key": "login_recency", "label": "Login recency", "value": 21.0, "score": 0.2,
        "weight": 25.0, "contribution": 5.0, "impact": 20.0, "explanation": "No login in 21 days",
        "missing": false, "source": "usage", "configured_weight": 25.0},
        {"key": "billing", "label": "Billing", "value": 0.0, "score": 1.0, "weight": 75.0,
        "contribution": 75.0, "impact": 0.0, "explanation": "Subscription active; no overdue invoices",
        "missing": false, "source": "billing", "configured_weight": 20.0}]"#;
    for sql in [
        format!(
            "INSERT INTO health_scores (account_id, computed_at, score, tier, model_version, signals)
             VALUES ({id}, now() - interval '2 days', 90, 'healthy', 1, '[]')"
        ),
        // The current score was rescored since its history row (no history row at its moment).
        format!(
            "INSERT INTO health_current (account_id, computed_at, score, tier, model_version, signals, previous_score, score_change)
             VALUES ({id}, now(), 80, 'healthy', 1, '{signals}', 90, -10)"
        ),
        format!(
            "INSERT INTO score_changes (account_id, previous_score, score, previous_tier, tier, drivers)
             VALUES ({id}, 90, 80, 'healthy', 'healthy', '[{{\"key\": \"login_recency\", \"impact\": 20.0, \"explanation\": \"No login in 21 days\"}}]')"
        ),
    ] {
        diesel::sql_query(&sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
    }
    drop(conn);
    drop(old);

    let applied = healthd::db::run_migrations(db.url()).await.unwrap();
    assert_eq!(applied.len(), 2, "{applied:?}");

    // A fresh pool: the tables changed shape under the old one.
    let pool = healthd::db::connect(db.url(), 2).await.unwrap();
    let current = healthd::accounts::health::current(&pool, &[id])
        .await
        .unwrap();
    let c = &current[&id];
    assert_eq!(c.score, 80.0);
    assert_eq!(
        c.signals.len(),
        2,
        "the breakdown moved into history intact"
    );
    assert_eq!(c.signals[0].label, "Login recency");
    assert_eq!(c.signals[0].explanation, "No login in 21 days");
    assert_eq!(c.signals[0].contribution, 5.0);
    let history = healthd::accounts::health::history(
        &pool,
        &[(id, chrono::Utc::now() - chrono::Duration::days(30))],
    )
    .await
    .unwrap();
    assert_eq!(
        history[0].len(),
        2,
        "the old history row and the current score's"
    );
    assert!(history[0][0].signals.is_empty());

    let feed = healthd::feed::score_changes_after(&pool, 0, 10)
        .await
        .unwrap();
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0].drivers[0]["explanation"], "No login in 21 days");

    // Rescoring the upgraded database works and keeps the one-breakdown rule.
    drop(pool);
    let s = healthd::scoring::rescore_at(
        db.pool(),
        healthd::scoring::RescoreScope::All,
        chrono::Utc::now() + chrono::Duration::hours(1),
    )
    .await;
    assert!(s.is_ok(), "{s:?}");
}
