//! The README's quick start, run as written: its commands are taken from the README itself
//! (`cargo run --release -p meshgate --` becomes the binary under test, nothing else).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::eventually;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const CARGO_RUN: &str = "cargo run --release -p meshgate --";

fn readme() -> String {
    std::fs::read_to_string(format!("{REPO}/README.md")).unwrap()
}

/// The README's `cargo run` line that contains `needle`, from its start to the end of the
/// command (a code span or a line).
fn agent_command(readme: &str, needle: &str) -> String {
    let start = readme.find(needle).unwrap_or_else(|| panic!("the README has `{needle}`"));
    let start = readme[..start].rfind(CARGO_RUN).expect("a cargo run command");
    let rest = &readme[start..];
    let end = rest.find(['`', '\n']).unwrap_or(rest.len());
    rest[..end].replace(CARGO_RUN, env!("CARGO_BIN_EXE_meshgate"))
}

/// A command from the README, run by `sh` in `dir`; killed on drop.
struct Running(Child);

impl Running {
    fn start(line: &str, dir: &std::path::Path) -> Self {
        let child = Command::new("sh")
            .args(["-c", &format!("exec {line}")])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a shell line as written; its output if it succeeded.
async fn sh(line: &str) -> Option<String> {
    let out = tokio::process::Command::new("sh").args(["-c", line]).output().await.unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `curl` code span of the README that starts with `prefix`.
fn curl_line(readme: &str, prefix: &str) -> String {
    let start = readme.find(&format!("`{prefix}")).unwrap_or_else(|| panic!("the README has `{prefix}`")) + 1;
    let end = readme[start..].find('`').unwrap();
    readme[start..start + end].to_owned()
}

/// The output of `line` once it succeeds with some (the agent just started).
async fn answered(line: &str) -> String {
    let mut answer = String::new();
    eventually(&format!("`{line}` answers"), Duration::from_secs(20), async || {
        answer = sh(line).await.unwrap_or_default();
        !answer.is_empty()
    })
    .await;
    answer
}

#[tokio::test]
async fn the_quick_start_works_as_written() {
    let readme = readme();
    let dir = tempfile::tempdir().unwrap();
    // Step 1: the command of "The two commands", with `--example` since this machine runs Docker.
    let start = agent_command(&readme, "--http-listen 127.0.0.1:8080\n");
    let agent = Running::start(&format!("{start} --example"), dir.path());
    // Step 2: the request.
    let request = curl_line(&readme, "curl -H 'Host: whoami.localhost' http://127.0.0.1:8080/");
    let answer = answered(&request).await;
    assert!(answer.contains("whoami") && answer.contains("x-forwarded-for"), "{answer}");
    // Step 3: look at it.
    let ready = sh(&curl_line(&readme, "curl 127.0.0.1:9090/readyz")).await.unwrap();
    assert!(ready.contains("\"ready\": true"), "{ready}");
    drop(agent);

    // Step 4: a routes file of one's own, the README's TOML as routes.toml.
    let section = &readme[readme.find("**Route your own service**").unwrap()..];
    let toml = section.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).unwrap();
    let toml: String = toml.lines().map(str::trim_start).collect::<Vec<_>>().join("\n");
    std::fs::write(dir.path().join("routes.toml"), toml).unwrap();
    let _agent = Running::start(&agent_command(&readme, "--routes-file routes.toml"), dir.path());
    let answer = answered(&request.replace("whoami.localhost", "shop.localhost")).await;
    assert!(answer.contains("whoami") && answer.contains("host: shop.localhost"), "{answer}");
}
