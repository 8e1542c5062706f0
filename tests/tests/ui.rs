//! The on-call web page in a real browser (issue 15): Debian's chromium, driven by playwright-core
//! from `tests/ui/ui.test.mjs`, against a real system with sample orders. This test makes the
//! sagas, runs the browser's tests, then checks from the API what the clicks did.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use saga_e2e::{charge_input, order_body, workspace_root, Options, System, ADMIN_TOKEN, READ_TOKEN};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(90);

/// Places an order and returns its saga id.
async fn place(system: &System, key: &str, body: &Value) -> anyhow::Result<String> {
    let (status, order) = system.place_order(key, body).await?;
    anyhow::ensure!(status == 201, "placing {key}: {status} {order}");
    Ok(order["saga_id"].as_str().unwrap_or_default().to_owned())
}

/// The browser and playwright-core: Debian's chromium (scripts/lib.sh installs it) and the
/// lockfile's playwright-core (installed here from the npm registry when missing).
fn browser_tools(dir: &PathBuf) -> anyhow::Result<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    anyhow::ensure!(
        std::path::Path::new(&chromium).exists(),
        "no browser at {chromium}: scripts/test installs Debian's chromium (ensure_chromium in scripts/lib.sh)"
    );
    if !dir.join("node_modules/playwright-core").is_dir() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefer-offline"])
            .current_dir(dir)
            .status()?;
        anyhow::ensure!(status.success(), "npm ci in {} failed", dir.display());
    }
    Ok(chromium)
}

/// Runs `tests/ui/ui.test.mjs` with `env`; its report, or an error if a test failed.
async fn browser_tests(env: &[(&str, String)]) -> anyhow::Result<String> {
    let dir = workspace_root().join("tests/ui");
    let chromium = browser_tools(&dir)?;
    let output = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=spec", "ui.test.mjs"])
        .current_dir(&dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CHROMIUM", chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), output).await??;
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
    anyhow::ensure!(output.status.success(), "the browser tests failed ({})", output.status);
    Ok(report)
}

#[tokio::test]
async fn the_on_call_page_works_in_a_real_browser() -> anyhow::Result<()> {
    // The fault definitions: 5 s timeouts and short backoffs, so a refund that keeps failing
    // parks its saga within seconds.
    let system = System::start_with(Options::default().fault_definitions()).await?;
    system.set_stock("SKU-UI", 100).await?;
    let good = place(&system, "ui-good", &order_body("SKU-UI", 1, "tok_visa", "12345")).await?;
    let declined = place(&system, "ui-declined", &order_body("SKU-UI", 1, "tok_declined", "12345")).await?;
    // A bad address fails the shipment; its refund then fails five times, the budget: parked.
    let parked = place(&system, "ui-parked", &order_body("SKU-UI", 1, "tok_refund_fails_5", "00000")).await?;
    system.wait_terminal(&good, SETTLE).await?;
    let declined_saga = system.wait_terminal(&declined, SETTLE).await?;
    assert_eq!(declined_saga["failure"]["code"], "PAYMENT_DECLINED", "{declined_saga:#}");
    system.wait_status(&parked, "NEEDS_ATTENTION", SETTLE).await?;
    // A reply nobody can read: dead-lettered by the orchestrator, for the page's dead letters.
    system.publish("saga-replies", "ui-garbage", Some(b"{not json"), &[]).await?;
    let dead_lettered = async {
        loop {
            let (_, page) = system.api_get("/api/v1/dead-letters?reason=invalid_json").await?;
            if page["count"].as_u64() == Some(1) {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::time::timeout(SETTLE, dead_lettered).await??;

    let shots = std::env::var("UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| saga_e2e::bin_dir().join("ui-screenshots"));
    let env = [
        ("SAGA_URL", system.url("orchestrator", "")),
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("READ_TOKEN", READ_TOKEN.to_owned()),
        ("DECLINED_ORDER", declined_saga["business_key"].as_str().unwrap_or_default().to_owned()),
        ("PARKED_SAGA", parked.clone()),
        ("SCREENSHOTS", shots.display().to_string()),
    ];
    let report = browser_tests(&env).await?;
    anyhow::ensure!(report.contains("ℹ fail 0") && !report.contains("ℹ pass 0"), "{report}");

    // What the page did, seen from the API: one retry (the double click acted once), and the
    // saga finished its compensations.
    let (status, audit) = system.api_get(&format!("/api/v1/sagas/{parked}/audit")).await?;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{audit:#}");
    assert_eq!((entries[0]["action"].as_str(), entries[0]["actor"].as_str()), (Some("RETRY"), Some("admin")));
    assert_eq!(system.saga(&parked).await?["status"], "FAILED");
    // The replay the page made, recorded with its actor and reason.
    let (_, letters) = system.api_get("/api/v1/dead-letters?reason=invalid_json&replayed=true").await?;
    let replayed = &letters["items"][0]["replayed"];
    assert_eq!((replayed["actor"].as_str(), replayed["times"].as_i64()), (Some("admin"), Some(1)), "{letters:#}");
    system.stop().await
}

/// `GET /api/v1/session`: what the page asks after sign-in.
#[tokio::test]
async fn the_session_says_who_the_token_is() -> anyhow::Result<()> {
    let system = System::start_with(Options {
        skip: vec!["order", "inventory", "payment", "fulfilment", "notification"],
        ..Options::default()
    })
    .await?;
    let ask = |token: Option<&str>| {
        let mut request = reqwest::Client::new().get(system.url("orchestrator", "/api/v1/session"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await?;
            Ok::<_, anyhow::Error>((response.status().as_u16(), response.json::<Value>().await?))
        }
    };
    let (status, admin) = ask(Some(ADMIN_TOKEN)).await?;
    assert_eq!((status, admin["name"].as_str(), admin["scope"].as_str()), (200, Some("admin"), Some("admin")));
    assert_eq!(admin["auth"], "tokens");
    let (_, reader) = ask(Some(READ_TOKEN)).await?;
    assert_eq!(reader["scope"], "read");
    let (status, _) = ask(Some("not-a-token-0123456789")).await?;
    assert_eq!(status, 401);
    let (status, _) = ask(None).await?;
    assert_eq!(status, 401);
    // The page itself needs no token, and a deep link gets it.
    let page = reqwest::get(system.url("orchestrator", "/ui/sagas/0190d0a4-0000-7000-8000-000000000000")).await?;
    assert_eq!(page.status(), 200);
    assert!(page.text().await?.contains("<div id=\"app\">"));
    system.stop().await
}

/// With auth off (local development) the session says so, and the page opens without sign-in
/// and shows it in a banner; an abort from the page (anyone may act, as "anonymous").
#[tokio::test]
async fn with_auth_off_the_session_says_so() -> anyhow::Result<()> {
    let options =
        Options { skip: vec!["order", "inventory", "payment", "fulfilment", "notification"], ..Options::default() }
            .env("orchestrator", "AUTH_DISABLED", "true")
            .test_definitions();
    let system = System::start_with(options).await?;
    // Waits for inventory, which is not running: a saga to abort from the page.
    let running = system.start_saga("ops-slow", &charge_input("SKU-UI", 1, "tok_visa"), "ui-abort").await?;
    system.wait_status(&running, "RUNNING", SETTLE).await?;
    let response = reqwest::get(system.url("orchestrator", "/api/v1/session")).await?;
    assert_eq!(response.status(), 200);
    let session: Value = response.json().await?;
    assert_eq!((session["auth"].as_str(), session["scope"].as_str()), (Some("disabled"), Some("admin")), "{session}");
    // In the browser: no sign-in, the banner, and an abort.
    let env =
        [("AUTH_OFF", "1".to_owned()), ("SAGA_URL", system.url("orchestrator", "")), ("RUNNING_SAGA", running.clone())];
    let report = browser_tests(&env).await?;
    anyhow::ensure!(report.contains("ℹ pass 2") && report.contains("ℹ fail 0"), "{report}");
    let (_, audit) = system.api_get(&format!("/api/v1/sagas/{running}/audit")).await?;
    let entries = audit["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{audit:#}");
    assert_eq!((entries[0]["action"].as_str(), entries[0]["actor"].as_str()), (Some("ABORT"), Some("anonymous")));
    assert_eq!(system.saga(&running).await?["status"], "COMPENSATING");
    system.stop().await
}
