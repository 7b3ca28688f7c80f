//! The connectors GraphQL API: plugins, instance CRUD, runs with rejections, sync now, identity
//! mapping, and who may do what.

use async_graphql::{Request, Variables};
use healthd::app::AppState;
use healthd::auth::{Role, Viewer};
use healthd::config::Config;
use healthd::graphql::{build_schema, HealthdSchema};
use healthd::plugins::PluginRegistry;
use healthd::testing::TestDb;
use serde_json::{json, Value};

#[path = "support/plugin_libs.rs"]
#[allow(dead_code)]
mod plugin_libs;

fn csv_plugin() -> PluginRegistry {
    plugin_libs::csv_registry()
}

struct Api {
    _db: TestDb,
    schema: HealthdSchema,
}

impl Api {
    async fn new() -> Api {
        let db = TestDb::new().await;
        let state =
            AppState::with_plugins(db.pool().clone(), db.url(), Config::default(), csv_plugin());
        Api {
            schema: build_schema(Some(state)),
            _db: db,
        }
    }

    async fn raw(&self, role: Role, query: &str, vars: Value) -> async_graphql::Response {
        let request = Request::new(query)
            .variables(Variables::from_json(vars))
            .data(Viewer {
                token_id: 1,
                name: "test".into(),
                role,
            });
        self.schema.execute(request).await
    }

    async fn ok(&self, role: Role, query: &str, vars: Value) -> Value {
        let r = self.raw(role, query, vars).await;
        assert!(r.errors.is_empty(), "{:?}\n{query}", r.errors);
        r.data.into_json().unwrap()
    }

    async fn err(&self, role: Role, query: &str, vars: Value) -> String {
        let r = self.raw(role, query, vars).await;
        assert!(!r.errors.is_empty(), "expected an error from {query}");
        r.errors[0].message.clone()
    }
}

const CREATE: &str = "mutation($input: CreateConnectorInput!) { createConnector(input: $input) { name plugin schedule status enabled settings nextRunAt } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_connectors_and_viewers_watch_them() {
    let api = Api::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("usage_events.csv"),
        "account_key,event,occurred_at\nacme,login,2026-11-23T09:00:00Z\nacme,login,not-a-time\n",
    )
    .unwrap();

    let plugins = api
        .ok(
            Role::Viewer,
            "{ connectorPlugins { name loaded recordKinds } }",
            json!({}),
        )
        .await;
    assert_eq!(plugins["connectorPlugins"][0]["name"], "csv");
    assert_eq!(plugins["connectorPlugins"][0]["loaded"], true);

    let input = json!({"input": {"name": "files", "plugin": "csv", "schedule": "every 1h",
                                 "settings": {"dir": dir.path()}}});
    let e = api.err(Role::Editor, CREATE, input.clone()).await;
    assert!(e.contains("admin role"), "{e}");
    let created = api.ok(Role::Admin, CREATE, input.clone()).await;
    assert_eq!(created["createConnector"]["status"], "IDLE");
    assert_eq!(
        created["createConnector"]["settings"]["dir"],
        json!(dir.path())
    );
    let e = api.err(Role::Admin, CREATE, input).await;
    assert!(e.contains("already exists"), "{e}");
    let e = api
        .err(
            Role::Admin,
            CREATE,
            json!({"input": {"name": "x", "plugin": "nope"}}),
        )
        .await;
    assert!(e.contains("no plugin named `nope`"), "{e}");
    let e = api
        .err(
            Role::Admin,
            CREATE,
            json!({"input": {"name": "y", "plugin": "csv", "settings": {"dri": "/tmp"}}}),
        )
        .await;
    assert!(e.contains("invalid settings"), "{e}");
    let e = api
        .err(
            Role::Admin,
            CREATE,
            json!({"input": {"name": "z", "plugin": "csv", "schedule": "every fortnight",
                              "settings": {"dir": "/tmp"}}}),
        )
        .await;
    assert!(e.contains("invalid schedule"), "{e}");

    let run = api
        .ok(
            Role::Admin,
            "mutation { syncConnector(name: \"files\") { id status recordsIngested recordsRejected rejections { file line reason } error } }",
            json!({}),
        )
        .await;
    let run = &run["syncConnector"];
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    assert_eq!(run["recordsIngested"], 1);
    assert_eq!(run["recordsRejected"], 1);
    assert_eq!(run["rejections"][0]["file"], "usage_events.csv");
    assert_eq!(run["rejections"][0]["line"], 3);

    let list = api
        .ok(
            Role::Viewer,
            "{ connectors { name status settings recordsIngested lastSuccessAt lastError lastRun { status } }
               connectorRuns(name: \"files\", first: 5) { id status startedAt finishedAt } }",
            json!({}),
        )
        .await;
    let c = &list["connectors"][0];
    assert_eq!(c["settings"], Value::Null, "settings are for admins only");
    assert_eq!(c["recordsIngested"], 1);
    assert!(c["lastSuccessAt"].is_string());
    assert_eq!(c["lastError"], Value::Null);
    assert_eq!(list["connectorRuns"].as_array().unwrap().len(), 1);

    let updated = api
        .ok(
            Role::Admin,
            "mutation { updateConnector(name: \"files\", input: {schedule: \"*/10 * * * *\"}) { schedule }
                        disableConnector(name: \"files\") { status } }",
            json!({}),
        )
        .await;
    assert_eq!(updated["updateConnector"]["schedule"], "*/10 * * * *");
    assert_eq!(updated["disableConnector"]["status"], "DISABLED");
    let enabled = api
        .ok(
            Role::Admin,
            "mutation { enableConnector(name: \"files\") { status } }",
            json!({}),
        )
        .await;
    assert_eq!(enabled["enableConnector"]["status"], "IDLE");

    let e = api
        .err(
            Role::Viewer,
            "{ accountIdentities(source: \"files\") { externalKey } }",
            json!({}),
        )
        .await;
    assert!(e.contains("admin role"), "{e}");
    let ids = api
        .ok(
            Role::Admin,
            "{ accountIdentities(source: \"files\") { source externalKey accountKey matchedBy } }",
            json!({}),
        )
        .await;
    assert_eq!(
        ids["accountIdentities"],
        json!([{"source": "files", "externalKey": "acme", "accountKey": "acme", "matchedBy": "key"}])
    );
    let e = api
        .err(
            Role::Admin,
            "mutation { remapAccountIdentity(source: \"files\", externalKey: \"acme\", accountKey: \"nobody\") { accountKey } }",
            json!({}),
        )
        .await;
    assert!(e.contains("no account with key `nobody`"), "{e}");

    let deleted = api
        .ok(
            Role::Admin,
            "mutation { deleteConnector(name: \"files\") }",
            json!({}),
        )
        .await;
    assert_eq!(deleted["deleteConnector"], true);
    let e = api
        .err(
            Role::Viewer,
            "{ connectorRuns(name: \"files\") { id } }",
            json!({}),
        )
        .await;
    assert!(e.contains("no connector named `files`"), "{e}");
}
