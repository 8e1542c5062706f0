//! The Grafana dashboard (`k8s/components/monitoring/grafana/saga-metrics.json`) and the alert rules
//! (`k8s/components/monitoring/prometheus-rules.yaml`) the project ships: every query parses as PromQL, and every metric
//! they read is one the running services really serve, so a renamed metric cannot leave a panel
//! or an alert silently empty.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};
use saga_e2e::faults::{self, Kind};
use saga_e2e::{System, SERVICES};
use serde_json::{json, Value};

const DASHBOARD: &str = include_str!("../../k8s/components/monitoring/grafana/saga-metrics.json");
const RULES: &str = include_str!("../../k8s/components/monitoring/prometheus-rules.yaml");

/// `(where, expression)` of every panel query of the dashboard.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let dashboard: Value = serde_json::from_str(DASHBOARD).context("the dashboard is not JSON")?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("a target without expr")?;
            queries.push((format!("panel {:?}", panel["title"].as_str().unwrap_or("?")), expr.to_owned()));
        }
    }
    Ok(queries)
}

/// `(where, expression)` of every alert rule.
fn rule_queries() -> anyhow::Result<Vec<(String, String)>> {
    let rules: Value = serde_norway::from_str(RULES).context("the alert rules are not YAML")?;
    let mut queries = Vec::new();
    for group in rules["spec"]["groups"].as_array().context("no rule groups")? {
        for rule in group["rules"].as_array().context("a group without rules")? {
            let name = rule["alert"].as_str().context("a rule without a name")?;
            queries.push((format!("alert {name}"), rule["expr"].as_str().context("a rule without expr")?.to_owned()));
        }
    }
    Ok(queries)
}

struct Names(BTreeSet<String>);

impl ExprVisitor for Names {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        let name = match expr {
            Expr::VectorSelector(selector) => selector.name.clone(),
            Expr::MatrixSelector(matrix) => matrix.vs.name.clone(),
            _ => None,
        };
        self.0.extend(name);
        Ok(true)
    }
}

/// The metric names an expression reads; an error if it is not PromQL.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let parsed = parser::parse(expr)?;
    let mut names = Names(BTreeSet::new());
    let Ok(_) = walk_expr(&mut names, &parsed);
    Ok(names.0)
}

fn all_queries() -> anyhow::Result<Vec<(String, String)>> {
    let mut queries = dashboard_queries()?;
    queries.extend(rule_queries()?);
    Ok(queries)
}

#[test]
fn every_query_of_the_dashboard_and_the_alerts_is_promql() -> anyhow::Result<()> {
    let dashboard: Value = serde_json::from_str(DASHBOARD)?;
    // The runbook links http://grafana.company.com/d/saga-metrics.
    assert_eq!(dashboard["uid"], "saga-metrics");
    let queries = all_queries()?;
    assert!(queries.len() >= 30, "only {} queries found", queries.len());
    let mut broken = Vec::new();
    for (place, expr) in &queries {
        match metric_names(expr) {
            Ok(names) if names.is_empty() => broken.push(format!("{place}: reads no metric: {expr}")),
            Ok(_) => {}
            Err(error) => broken.push(format!("{place}: {error}: {expr}")),
        }
    }
    // The check itself rejects what is not PromQL.
    assert!(metric_names("sum(rate(saga_failed_total[5m])").is_err());
    assert!(broken.is_empty(), "{broken:#?}");
    Ok(())
}

#[test]
fn every_kubernetes_manifest_is_yaml() -> anyhow::Result<()> {
    fn walk(dir: &std::path::Path, read: &mut usize) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, read)?;
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path)?;
                for document in serde_norway::Deserializer::from_str(&text) {
                    let value = <Value as serde::Deserialize>::deserialize(document)
                        .with_context(|| format!("{} is not valid YAML", path.display()))?;
                    assert!(value["kind"].is_string(), "{}: a document without kind", path.display());
                    *read += 1;
                }
            }
        }
        Ok(())
    }
    // The schemas, the custom resources and the policy are scripts/check-deploy's.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s");
    let mut read = 0;
    walk(&dir, &mut read)?;
    assert!(read >= 40, "only {read} manifests read in {}", dir.display());
    Ok(())
}

/// Every metric name the services serve right now.
async fn served(system: &System) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for service in SERVICES {
        let text = system.http.get(system.metrics_url(service)).send().await?.text().await?;
        names.extend(
            text.lines()
                .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
                .filter_map(|line| line.split(['{', ' ']).next())
                .map(str::to_owned),
        );
    }
    Ok(names)
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_read_is_served() -> anyhow::Result<()> {
    let system = System::start().await?;
    let before = faults::stock_up(&system, &["DASH-A"], 100).await?;
    assert_eq!(before["DASH-A"], 100);
    // A saga that completes, one that fails and is compensated, an unreadable reply and a start
    // request for an unknown saga type: the events the counters count.
    let placed = vec![
        faults::place(&system, "dash-good", Kind::Good, "DASH-A", 1).await?,
        faults::place(&system, "dash-declined", Kind::Declined, "DASH-A", 1).await?,
    ];
    faults::settle(&system, &placed, Duration::from_secs(90)).await?;
    system.publish("saga-replies", "dash", Some(b"{not json"), &[]).await?;
    let start = json!({"schema_version": 1, "saga_id": uuid::Uuid::new_v4(), "saga_type": "no-such-saga",
        "idempotency_key": "dash-start", "business_key": "dash-start", "input": {}});
    system.publish("saga-start-requests", "dash-start", Some(start.to_string().as_bytes()), &[]).await?;
    let (status, _) = system.api_get("/api/v1/sagas?status=FAILED&limit=10").await?;
    assert_eq!(status, 200);

    let mut wanted = BTreeSet::new();
    for (place, expr) in all_queries()? {
        wanted.extend(metric_names(&expr).map_err(|e| anyhow::anyhow!("{place}: {e}"))?);
    }
    // Prometheus writes `up` itself for each target it scrapes (the target-health alerts).
    assert!(wanted.remove("up"), "no alert watches the targets' `up`");
    // Gauges are sampled every 5 s and the dead letters go through the outbox: wait for them.
    let started = Instant::now();
    loop {
        let served = served(&system).await?;
        let missing: Vec<&String> = wanted.difference(&served).collect();
        if missing.is_empty() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the dashboard or the alerts read metrics no service serves: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(wanted.len() >= 20, "only {} metrics read: {wanted:?}", wanted.len());
    system.stop().await
}
