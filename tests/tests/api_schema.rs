//! Schemathesis against every service's OpenAPI document, with all its checks but one: no
//! server error, no response that breaks the document (status, content type, headers, body),
//! no valid request refused, authentication enforced. Left out: `negative_data_rejection`,
//! which fails wherever the server is more lenient than the document (it trims text, takes any
//! case of a status, humantime's spellings of a duration); a client that keeps to the document is
//! served either way.
//!
//! `scripts/test` installs schemathesis from PyPI into a virtualenv and sets `SCHEMATHESIS`.
//! Bounded: a fixed number of examples per operation, a fixed seed (so a run is reproducible;
//! `SCHEMATHESIS_SEED=<n>` explores others), the services run side by side.

use std::time::Duration;

use anyhow::Context;
use saga_e2e::{Options, System, ADMIN_TOKEN, SERVICES};

/// 422 is what a reused Idempotency-Key with another body answers (as the IETF idempotency-key
/// draft says): schema-valid, refused on purpose, so it is an expected status here.
const CONFIG: &str = r#"
[checks.positive_data_acceptance]
expected-statuses = ["2XX", "3XX", "401", "403", "404", "409", "422", "429", "5XX"]
"#;

#[tokio::test]
async fn every_service_keeps_to_its_openapi_document_under_schemathesis() -> anyhow::Result<()> {
    let st = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "st".to_owned());
    let version = tokio::process::Command::new(&st).arg("--version").output().await.with_context(|| {
        format!("schemathesis ({st}) is not installed: scripts/test installs it, or set SCHEMATHESIS to its `st`")
    })?;
    anyhow::ensure!(version.status.success(), "{st} --version failed");
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261130".to_owned());
    let system = System::start_with(Options::default().test_definitions()).await?;
    system.set_stock("SKU-FUZZ", 1000).await?;
    let config = saga_e2e::bin_dir().join("e2e-logs").join(&system.run_id).join("schemathesis.toml");
    std::fs::write(&config, CONFIG)?;
    let runs = SERVICES.map(|service| {
        let (st, seed, config) = (st.clone(), seed.clone(), config.clone());
        let url = system.url(service, "/api/v1/openapi.json");
        // More examples where there are more operations and rules.
        let examples = match service {
            "orchestrator" => "40",
            "order" | "inventory" => "60",
            _ => "20",
        };
        async move {
            let output = tokio::process::Command::new(&st)
                .env("NO_COLOR", "1")
                // Its cache goes beside the run's logs, not into the work tree.
                .current_dir(config.parent().expect("the log folder"))
                .arg("--config-file")
                .arg(&config)
                .args(["run", &url, "--checks", "all", "--exclude-checks", "negative_data_rejection"])
                .args(["--max-examples", examples, "--seed", &seed, "--workers", "1", "--request-timeout", "20"])
                .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
                .kill_on_drop(true)
                .output()
                .await?;
            anyhow::Ok((service, output))
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(240), futures::future::join_all(runs))
        .await
        .context("schemathesis did not finish within 240 s")?;
    let mut failed = Vec::new();
    for result in results {
        let (service, output) = result?;
        let text = String::from_utf8_lossy(&output.stdout);
        let summary: Vec<&str> = text.lines().filter(|l| l.contains("generated") || l.starts_with("=====")).collect();
        eprintln!("{service}: {}", summary.join(" | "));
        if !output.status.success() {
            failed.push(format!("{service}:\n{text}\n{}", String::from_utf8_lossy(&output.stderr)));
        }
    }
    system.stop().await?;
    assert!(failed.is_empty(), "schemathesis found problems:\n{}", failed.join("\n\n"));
    Ok(())
}
