//! Running the real `healthd` binary from end-to-end tests (shared by the test binaries that do).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `healthd` with no database, config file or chatty logs inherited from the environment.
pub fn healthd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_healthd"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("HEALTHD_DATABASE_URL")
        .env_remove("HEALTHD_CONFIG")
        .env("HEALTHD_LOG", "warn");
    cmd
}

/// Runs `token create` with `cmd` and returns the token (the last line printed).
pub fn create_token(mut cmd: Command, role: &str, name: &str) -> String {
    let out = cmd
        .args(["token", "create", "--role", role, "--name", name])
        .output()
        .expect("run healthd token create");
    assert!(
        out.status.success(),
        "token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .expect("token line")
        .trim()
        .to_string()
}

/// Starts `serve` on a free port with `cmd`; returns the child and its base URL
/// (`http://127.0.0.1:port`) once it reports where it listens.
pub fn spawn_serve(mut cmd: Command, wait: Duration) -> (Child, String) {
    let mut child = cmd
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn healthd serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("healthd listening on ") {
                let _ = tx.send(rest.trim_end_matches("/graphql").to_string());
            }
        }
    });
    let base = rx
        .recv_timeout(wait)
        .expect("healthd serve did not report its address in time");
    (child, base)
}
