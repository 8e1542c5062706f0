//! The README's first command: `scripts/demo` comes up with sample orders flowing, and the first
//! Ctrl-C stops it, services included, within seconds (issue 12: its order loop used to go on
//! after the cleanup). Runs alone (see .config/nextest.toml): the demo takes the runbook's fixed
//! ports.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Ctrl-C, as a terminal sends it: SIGINT to the whole foreground process group.
fn ctrl_c(group: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").args(["-s", "INT", "--", &format!("-{group}")]).status()?;
    anyhow::ensure!(status.success(), "kill -s INT -- -{group} failed");
    Ok(())
}

#[tokio::test]
async fn the_demo_comes_up_and_the_first_ctrl_c_stops_it_services_included() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    // As from a terminal: a shell started in the background (CI, a tool) ignores SIGINT, and a
    // non-interactive bash cannot trap a signal ignored on entry, so it is reset to its default.
    let mut demo = tokio::process::Command::new("env")
        .args(["--default-signal=INT", "bash"])
        .arg(root.join("scripts/demo"))
        .current_dir(&root)
        // As a person runs it: without the variables cargo and nextest set for tests (they would
        // make the demo's own `cargo build` rebuild what the test build had built).
        .env_clear()
        .envs(["PATH", "HOME", "USER", "LANG", "TMPDIR"].iter().filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))))
        .env("STATE_DIR", root.join("target/demo-test"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, as a terminal's foreground job.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("running scripts/demo")?;
    let group = demo.id().context("demo pid")?;
    let mut out = BufReader::new(demo.stdout.take().context("stdout")?).lines();
    let mut err = BufReader::new(demo.stderr.take().context("stderr")?).lines();
    let errors = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Ok(Some(line)) = err.next_line().await {
            lines.push(line);
        }
        lines
    });
    let started = Instant::now();
    let mut shown = Vec::new();
    let ready = loop {
        match tokio::time::timeout(Duration::from_secs(300), out.next_line()).await {
            Ok(Ok(Some(line))) => {
                let done = line.starts_with("Ready in");
                shown.push(line);
                if done {
                    break true;
                }
            }
            _ => break false,
        }
    };
    if !ready {
        let _ = ctrl_c(group);
        let _ = tokio::time::timeout(Duration::from_secs(20), demo.wait()).await;
        let errors = errors.await?.join("\n");
        anyhow::bail!("the demo never said Ready:\n{}\nstderr:\n{errors}", shown.join("\n"));
    }
    let table = shown.join("\n");
    for outcome in ["good order", "declined card", "out of stock", "undeliverable address"] {
        assert!(table.contains(outcome), "the demo's table lacks {outcome:?}:\n{table}");
    }
    assert!(port_open(8080) && port_open(8081), "the services listen on the runbook's ports");
    // The rest of what it prints, so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    // Let the stream of orders run a little, then SIGINT to the script alone, as `kill -INT` or
    // a supervisor sends it: the stricter case (a terminal's Ctrl-C goes to the whole group, and
    // also reaches the `sleep` the script waits on). The script must still stop, services
    // included, and its order loop must not go on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let interrupted = Instant::now();
    let sent = std::process::Command::new("kill").args(["-s", "INT", "--", &group.to_string()]).status()?;
    anyhow::ensure!(sent.success(), "kill -s INT {group} failed");
    let Ok(status) = tokio::time::timeout(Duration::from_secs(20), demo.wait()).await else {
        let _ = std::process::Command::new("kill").args(["-s", "KILL", "--", &format!("-{group}")]).status();
        let errors = errors.await?.join("\n");
        anyhow::bail!("the demo did not stop within 20 s of Ctrl-C; stderr:\n{errors}");
    };
    let status = status?;
    let took = interrupted.elapsed();
    let errors = errors.await?.join("\n");
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C; stderr:\n{errors}");
    assert!(took < Duration::from_secs(12), "stopping took {took:?}");
    assert!(!errors.contains("placing an order failed"), "the order loop went on after Ctrl-C:\n{errors}");
    for port in [8080, 8081, 8082, 8083, 8084, 8085, 9090, 6060] {
        assert!(!port_open(port), "port {port} still open: a service outlived the demo");
    }
    eprintln!("demo ready after {:?}, stopped {took:?} after Ctrl-C", started.elapsed());
    Ok(())
}
