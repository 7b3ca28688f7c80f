//! End to end, as a new user would: the real `healthd` binary with no database configured runs its
//! own PostgreSQL, hands out tokens, answers authenticated GraphQL, refuses anonymous requests,
//! keeps its data across restarts and leaves no PostgreSQL behind on SIGTERM.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[path = "support/process.rs"]
mod process;

fn healthd(data_dir: &Path) -> Command {
    let mut cmd = process::healthd();
    cmd.env("HEALTHD_DATA_DIR", data_dir);
    cmd
}

fn create_token(data_dir: &Path, role: &str, name: &str) -> String {
    process::create_token(healthd(data_dir), role, name)
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(data_dir: &Path) -> Server {
        let (child, base) = process::spawn_serve(healthd(data_dir), Duration::from_secs(90));
        Server { child, base }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "healthd did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

async fn graphql(base: &str, token: Option<&str>, query: &str) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("{base}/graphql"))
        .json(&serde_json::json!({ "query": query }));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("POST /graphql");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("pg").join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

fn postgres_processes_for(data_dir: &Path) -> Vec<i32> {
    let needle = data_dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("postgres") && cmdline.contains(&needle) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_with_no_database_configured() {
    let tmp = tempfile::Builder::new()
        .prefix("healthd-e2e-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let data_dir = tmp.path().join("data");

    // A token made before the server runs: starts and stops the private cluster.
    let admin = create_token(&data_dir, "admin", "e2e-admin");
    assert!(admin.starts_with("hd_"), "unexpected token format: {admin}");
    assert!(
        postgres_processes_for(&data_dir).is_empty(),
        "token create left PostgreSQL running"
    );

    let server = Server::start(&data_dir);
    let (status, body) = graphql(
        &server.base,
        Some(&admin),
        "{ accounts(first: 5) { totalCount } }",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["accounts"]["totalCount"], 0, "{body}");

    // No token, and a wrong token: 401 with a GraphQL error body.
    let (status, body) = graphql(&server.base, None, "{ accounts(first: 5) { totalCount } }").await;
    assert_eq!(status, 401);
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("Bearer"),
        "{body}"
    );
    let (status, _) = graphql(&server.base, Some("hd_not-a-real-token"), "{ me { role } }").await;
    assert_eq!(status, 401);

    // A second command on the same data dir uses the running cluster, and leaves it running.
    let pid_before = postmaster_pid(&data_dir).expect("postmaster.pid while serving");
    let viewer = create_token(&data_dir, "viewer", "e2e-viewer");
    assert_eq!(postmaster_pid(&data_dir), Some(pid_before));
    let (status, body) = graphql(&server.base, Some(&viewer), "{ me { name role } }").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["me"]["role"], "VIEWER", "{body}");

    // A viewer cannot do admin work: a clear GraphQL error, not a crash.
    let (_, body) = graphql(
        &server.base,
        Some(&viewer),
        r#"mutation { createApiToken(name: "x", role: ADMIN) { token } }"#,
    )
    .await;
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("admin role"), "{body}");

    // Operations endpoints.
    let client = reqwest::Client::new();
    let health = client
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ready = client
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("healthd_graphql_requests_total"),
        "{metrics}"
    );
    let graphiql = client
        .get(format!("{}/graphql", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(graphiql.to_lowercase().contains("graphiql"));

    // SIGTERM: clean exit and no PostgreSQL left behind.
    let status = server.terminate();
    assert!(status.success(), "healthd exited with {status}");
    assert!(
        postgres_processes_for(&data_dir).is_empty(),
        "PostgreSQL still running after SIGTERM: {:?}",
        postgres_processes_for(&data_dir)
    );

    // A second start finds its data again: the first token still works.
    let server = Server::start(&data_dir);
    let (status, body) = graphql(&server.base, Some(&admin), "{ me { name } }").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["me"]["name"], "e2e-admin");
    assert!(server.terminate().success());
    assert!(postgres_processes_for(&data_dir).is_empty());
}

#[test]
fn schema_command_prints_schema_graphql() {
    let out = Command::new(env!("CARGO_BIN_EXE_healthd"))
        .arg("schema")
        .output()
        .expect("run healthd schema");
    assert!(out.status.success());
    let on_disk =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schema.graphql"))
            .expect("schema.graphql");
    assert!(
        String::from_utf8(out.stdout).unwrap() == on_disk,
        "`healthd schema` differs from schema.graphql; regenerate it with `cargo run -p healthd -- schema > schema.graphql`"
    );
}
