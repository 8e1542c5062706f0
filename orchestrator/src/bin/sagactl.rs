//! `sagactl`: the on-call command line for the saga orchestrator's API. Tables for people,
//! `--output json` for scripts, and exit codes scripts can trust (see `sagactl --help`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use saga_runtime::config::parse_secret;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  unexpected error (a response that could not be read)
  2  bad command line
  3  not found (no such saga or definition)
  4  refused: the saga's state does not allow it (409), or the Idempotency-Key was used for another request (422)
  5  not authenticated or not allowed (401, 403): check SAGA_API_TOKEN and its scope
  6  bad input (400, 413)
  7  the orchestrator could not be reached or failed (5xx)";

#[derive(Debug, Parser)]
#[command(name = "sagactl", version, about = "Query and operate sagas through the orchestrator's API", after_help = EXIT_CODES)]
struct Cli {
    /// Base URL of the orchestrator's API.
    #[arg(long, env = "SAGA_API_URL", default_value = "http://localhost:8080", global = true)]
    url: String,
    /// Bearer token (scope read for queries, admin for retry and abort).
    #[arg(long, env = "SAGA_API_TOKEN", hide_env_values = true, value_parser = parse_secret, global = true)]
    token: Option<SecretString>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Seconds to wait for the API.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Args, Default)]
struct Filter {
    /// Status (repeat or separate with commas): RUNNING, COMPENSATING, COMPLETED, FAILED, NEEDS_ATTENTION.
    #[arg(long, value_delimiter = ',')]
    status: Vec<String>,
    /// Saga type, e.g. order-fulfilment.
    #[arg(long)]
    saga_type: Option<String>,
    /// The step that failed (or whose compensation needs a human).
    #[arg(long)]
    failed_step: Option<String>,
    /// Error code of the failure, e.g. PAYMENT_DECLINED.
    #[arg(long)]
    failure_code: Option<String>,
    /// Business key (for orders, the order id).
    #[arg(long)]
    business_key: Option<String>,
    /// Created at or after (RFC 3339).
    #[arg(long)]
    created_after: Option<String>,
    /// Created before (RFC 3339).
    #[arg(long)]
    created_before: Option<String>,
    /// Changed at or after (RFC 3339).
    #[arg(long, conflicts_with = "since")]
    updated_after: Option<String>,
    /// Changed within this long back from now (e.g. 15m, 1h, 7d): with --status FAILED, what
    /// failed in the last hour.
    #[arg(long, value_parser = parse_since)]
    since: Option<Duration>,
    /// Changed before (RFC 3339).
    #[arg(long)]
    updated_before: Option<String>,
    /// Not finished and started longer ago than this (e.g. 15m, 2h).
    #[arg(long, visible_alias = "stuck")]
    stuck_for: Option<String>,
    /// Not finished and past its step deadline.
    #[arg(long)]
    past_deadline: bool,
}

impl Filter {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs: Vec<(&'static str, String)> = Vec::new();
        if !self.status.is_empty() {
            pairs.push(("status", self.status.join(",")));
        }
        let optional = [
            ("saga_type", &self.saga_type),
            ("failed_step", &self.failed_step),
            ("failure_code", &self.failure_code),
            ("business_key", &self.business_key),
            ("created_after", &self.created_after),
            ("created_before", &self.created_before),
            ("updated_after", &self.updated_after),
            ("updated_before", &self.updated_before),
            ("stuck_for", &self.stuck_for),
        ];
        pairs.extend(optional.into_iter().filter_map(|(name, value)| value.clone().map(|v| (name, v))));
        // `parse_since` bounds it to a year, so the subtraction cannot overflow.
        let after =
            self.since.and_then(|since| chrono::Utc::now().checked_sub_signed(chrono::Duration::from_std(since).ok()?));
        if let Some(after) = after {
            pairs.push(("updated_after", after.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)));
        }
        if self.past_deadline {
            pairs.push(("past_deadline", "true".to_owned()));
        }
        pairs
    }

    fn json(&self) -> Value {
        let mut object = serde_json::Map::new();
        for (name, value) in self.pairs() {
            let value = match name {
                "status" => json!(value.split(',').collect::<Vec<_>>()),
                "past_deadline" => json!(true),
                _ => json!(value),
            };
            object.insert(name.to_owned(), value);
        }
        Value::Object(object)
    }
}

/// A duration back from now, such as 90s, 15m, 1h or 7d.
fn parse_since(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(366 * 86_400))
        .ok_or_else(|| format!("{text:?} is not a duration such as 90s, 15m, 1h or 7d (at most 366 days)"))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List sagas, newest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Sagas per page (1 to 500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Continue after a previous page (its `next` cursor).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one saga: steps, attempts, compensations and history.
    Show { id: String },
    /// Counts, success rate, failures by step and code, and durations over a window.
    Stats {
        /// A duration back from now (e.g. 15m, 1h, 7d); default 1h.
        #[arg(long, conflicts_with = "from")]
        window: Option<String>,
        /// Start of the window (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// End of the window (RFC 3339); default now.
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        saga_type: Option<String>,
    },
    /// Re-drive a saga from where it stopped (NEEDS_ATTENTION or stuck).
    Retry(Action),
    /// Stop a running saga and compensate what it did.
    Abort(Action),
    /// Retry every saga matching a filter (NEEDS_ATTENTION unless --status says otherwise).
    BulkRetry {
        #[command(flatten)]
        filter: Filter,
        /// Most sagas to touch (1 to 500), oldest first.
        #[arg(long)]
        limit: u32,
        /// Why (required unless --dry-run).
        #[arg(long)]
        reason: Option<String>,
        /// Only show what would be retried.
        #[arg(long)]
        dry_run: bool,
        /// Makes a repeated command do nothing twice.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// The audit log of a saga: who did what, when and why.
    Audit { id: String },
    /// The loaded saga definitions.
    Definitions,
    /// What the orchestrator keeps and for how long: per policy its age limit, rows, rows past
    /// their age now, and what retention deleted since the orchestrator started.
    Retention,
    /// Dead letters: messages a consumer could not apply, and their replay.
    #[command(subcommand)]
    Dlq(Dlq),
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// Dead letters of every consumer, newest first: where from, why, and whether replayed.
    List {
        /// One dead-letter topic (e.g. saga-replies.dlq, or its source saga-replies).
        #[arg(long)]
        topic: Option<String>,
        /// Only this reason (invalid_json, unknown_saga, keeps_failing, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only those not replayed yet.
        #[arg(long, conflicts_with = "replayed")]
        pending: bool,
        /// Only those already replayed.
        #[arg(long)]
        replayed: bool,
        /// Most to show (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Re-publish dead letters to their source topic once the cause is fixed.
    Replay {
        /// Dead letter ids as listed (topic/partition@offset).
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
        /// Every dead letter not replayed yet (at most 500), optionally of --topic and --reason-code.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long, requires = "all")]
        topic: Option<String>,
        #[arg(long, requires = "all")]
        reason_code: Option<String>,
        /// Why, for the record (required unless --dry-run).
        #[arg(long, required_unless_present = "dry_run")]
        reason: Option<String>,
        /// Replay again those replayed before.
        #[arg(long)]
        force: bool,
        /// Only show what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
struct Action {
    /// The saga id.
    id: String,
    /// Why, for the audit log.
    #[arg(long)]
    reason: String,
    /// Makes a repeated command do nothing twice (default: a new key per run).
    #[arg(long)]
    idempotency_key: Option<String>,
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

fn exit_code(status: u16) -> u8 {
    match status {
        404 => 3,
        409 | 422 => 4,
        401 | 403 => 5,
        400 | 405 | 413 => 6,
        500..=599 => 7,
        _ => 1,
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<SecretString>,
}

impl Client {
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.expose_secret()),
            None => request,
        };
        let response = request.send().await.map_err(|e| Failure {
            code: 7,
            message: format!("cannot reach the orchestrator at {}: {e}", self.base),
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| Failure { code: 1, message: e.to_string() })?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let detail = body["detail"].as_str().map(str::to_owned).unwrap_or_else(|| body.to_string());
        Err(Failure { code: exit_code(status), message: format!("{status}: {detail}") })
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, Failure> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query)).await
    }

    async fn post(&self, path: &str, body: &Value, key: Option<&str>) -> Result<Value, Failure> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(request).await
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    table.to_string()
}

fn problem_of(saga: &Value) -> String {
    let failure = |v: &Value| format!("{} {}", text(&v["step"]), text(&v["code"]));
    match (&saga["failure"], &saga["attention"]) {
        (_, a) if a.is_object() => format!("attention: {}", failure(a)),
        (f, _) if f.is_object() => failure(f),
        _ => "-".to_owned(),
    }
}

fn render_list(page: &Value) -> String {
    let rows = page["items"].as_array().into_iter().flatten().map(|s| {
        vec![
            text(&s["id"]),
            text(&s["saga_type"]),
            text(&s["status"]),
            format!("{} {}", text(&s["last_step"]["name"]), text(&s["last_step"]["kind"]).to_lowercase()),
            problem_of(s),
            text(&s["created_at"]),
        ]
    });
    let mut out = table(&["ID", "TYPE", "STATUS", "STEP", "FAILED AT / CODE", "CREATED"], rows);
    out.push_str(&format!("\n{} saga(s)", text(&page["count"])));
    if let Some(next) = page["next"].as_str() {
        out.push_str(&format!("; more with --cursor {next}"));
    }
    out
}

fn render_saga(saga: &Value) -> String {
    let mut out = String::new();
    for (name, value) in [
        ("id", &saga["id"]),
        ("type", &saga["saga_type"]),
        ("version of definition", &saga["definition_version"]),
        ("business key", &saga["business_key"]),
        ("status", &saga["status"]),
        ("created", &saga["created_at"]),
        ("updated", &saga["updated_at"]),
        ("ended", &saga["ended_at"]),
        ("trace id", &saga["trace_id"]),
        ("correlation id", &saga["correlation_id"]),
    ] {
        out.push_str(&format!("{name:<22} {}\n", text(value)));
    }
    out.push_str(&format!("{:<22} {}\n", "failure / attention", problem_of(saga)));
    if let Some(reason) = saga["failure"]["reason"].as_str() {
        out.push_str(&format!("{:<22} {reason}\n", "failure reason"));
    }
    if let Some(reason) = saga["attention"]["reason"].as_str() {
        out.push_str(&format!("{:<22} {reason}\n", "attention reason"));
    }
    let attempts = saga["steps"].as_array().into_iter().flatten().flat_map(|step| {
        let status = text(&step["status"]);
        let name = text(&step["name"]);
        step["attempts"].as_array().cloned().unwrap_or_default().into_iter().map(move |a| {
            vec![
                name.clone(),
                status.clone(),
                text(&a["kind"]).to_lowercase(),
                text(&a["attempt"]),
                text(&a["status"]),
                text(&a["error_code"]),
                text(&a["started_at"]),
            ]
        })
    });
    out.push_str("\nSteps and attempts\n");
    out.push_str(&table(&["STEP", "STEP STATUS", "KIND", "ATTEMPT", "OUTCOME", "ERROR", "STARTED"], attempts));
    let undone = saga["compensations"].as_array().cloned().unwrap_or_default();
    if !undone.is_empty() {
        out.push_str("\n\nUndone (compensations)\n");
        out.push_str(&table(
            &["STEP", "COMPENSATION", "STATUS", "ATTEMPTS"],
            undone.iter().map(|c| vec![text(&c["step"]), text(&c["action"]), text(&c["status"]), text(&c["attempts"])]),
        ));
    }
    out.push_str("\n\nHistory\n");
    out.push_str(&table(
        &["V", "AT", "TRIGGER", "STATUS", "WHAT"],
        saga["history"].as_array().into_iter().flatten().map(|h| {
            vec![
                text(&h["version"]),
                text(&h["recorded_at"]),
                text(&h["trigger"]),
                text(&h["to_status"]),
                text(&h["summary"]),
            ]
        }),
    ));
    out
}

fn render_stats(stats: &Value) -> String {
    let mut out = format!("{} to {}\n", text(&stats["from"]), text(&stats["to"]));
    out.push_str(&format!(
        "total {}, success rate {}\n",
        text(&stats["total"]),
        match stats["success_rate"].as_f64() {
            Some(rate) => format!("{:.2} %", rate * 100.0),
            None => "-".to_owned(),
        }
    ));
    let by_status = stats["by_status"].as_object().cloned().unwrap_or_default();
    out.push_str(&table(&["STATUS", "SAGAS"], by_status.iter().map(|(k, v)| vec![k.clone(), text(v)])));
    for (title, key) in [
        ("FAILED AT STEP", "failures_by_step"),
        ("FAILURE CODE", "failures_by_code"),
        ("NEEDS ATTENTION AT", "attention_by_step"),
    ] {
        let rows: Vec<Vec<String>> =
            stats[key].as_array().into_iter().flatten().map(|c| vec![text(&c["key"]), text(&c["count"])]).collect();
        if !rows.is_empty() {
            out.push('\n');
            out.push_str(&table(&[title, "SAGAS"], rows));
        }
    }
    let d = &stats["completed_duration_seconds"];
    if d.is_object() {
        out.push_str(&format!(
            "\ncompleted in p50 {:.3} s, p95 {:.3} s, p99 {:.3} s",
            d["p50"].as_f64().unwrap_or(0.0),
            d["p95"].as_f64().unwrap_or(0.0),
            d["p99"].as_f64().unwrap_or(0.0)
        ));
    }
    out
}

fn render_action(result: &Value) -> String {
    format!(
        "{} {}: {} -> {} (audit #{})\n{}",
        text(&result["action"]).to_lowercase(),
        text(&result["saga_id"]),
        text(&result["status_before"]),
        text(&result["status_after"]),
        text(&result["audit_id"]),
        text(&result["summary"])
    )
}

fn render_bulk(result: &Value) -> String {
    let mut out = table(
        &["SAGA", "BUSINESS KEY", "STATUS BEFORE", "RESULT", "DETAIL"],
        result["items"].as_array().into_iter().flatten().map(|i| {
            vec![
                text(&i["saga_id"]),
                text(&i["business_key"]),
                text(&i["status_before"]),
                text(&i["result"]),
                text(&i["detail"]),
            ]
        }),
    );
    out.push_str(&format!(
        "\n{}matched {}, retried {}, refused {}",
        if result["dry_run"] == true { "dry run: " } else { "" },
        text(&result["matched"]),
        text(&result["retried"]),
        text(&result["refused"])
    ));
    out
}

fn render_audit(log: &Value) -> String {
    table(
        &["#", "AT", "ACTION", "ACTOR", "BEFORE", "AFTER", "REASON"],
        log["entries"].as_array().into_iter().flatten().map(|e| {
            vec![
                text(&e["id"]),
                text(&e["recorded_at"]),
                text(&e["action"]),
                text(&e["actor"]),
                text(&e["status_before"]),
                text(&e["status_after"]),
                text(&e["reason"]),
            ]
        }),
    )
}

fn render_definitions(list: &Value) -> String {
    table(
        &["NAME", "VERSION", "LATEST", "STEPS"],
        list["items"].as_array().into_iter().flatten().map(|d| {
            let steps: Vec<String> = d["steps"].as_array().into_iter().flatten().map(|s| text(&s["name"])).collect();
            vec![text(&d["name"]), text(&d["version"]), text(&d["latest"]), steps.join(" -> ")]
        }),
    )
}

fn render_retention(view: &Value) -> String {
    let mut out = table(
        &["POLICY", "KEEP", "ROWS (EST.)", "PAST AGE NOW", "DELETED SINCE START", "WHAT"],
        view["policies"].as_array().into_iter().flatten().map(|p| {
            let keep = if p["keep"].is_null() { "forever".to_owned() } else { text(&p["keep"]) };
            let past = match (&p["past_retention"], p["past_retention_capped"].as_bool()) {
                (Value::Null, _) => "-".to_owned(),
                (n, Some(true)) => format!("> {}", text(n)),
                (n, _) => text(n),
            };
            let deleted: Vec<String> = p["deleted_since_start"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(table, n)| format!("{table} {}", text(n)))
                .collect();
            let mut what = text(&p["what"]);
            if !p["last_error"].is_null() {
                what = format!("{what} (last error: {})", text(&p["last_error"]));
            }
            vec![text(&p["policy"]), keep, text(&p["rows_estimate"]), past, deleted.join(", "), what]
        }),
    );
    out.push_str(&format!(
        "\nRuns every {}, at most {} rows per transaction; last round: {}. Dead-letter topics keep messages {}.\n",
        text(&view["interval"]),
        text(&view["batch_size"]),
        if view["last_run"].is_null() { "not yet".to_owned() } else { text(&view["last_run"]) },
        if view["dead_letter_topics_keep"].is_null() {
            "as the broker's default says".to_owned()
        } else {
            text(&view["dead_letter_topics_keep"])
        },
    ));
    out
}

fn render_dead_letters(page: &Value) -> String {
    let mut out = table(
        &["ID", "DEAD-LETTERED AT", "SERVICE", "SOURCE", "REASON", "ERROR", "REPLAYED"],
        page["items"].as_array().into_iter().flatten().map(|d| {
            let mut error = text(&d["error"]);
            if error.chars().count() > 80 {
                error = format!("{}…", error.chars().take(80).collect::<String>());
            }
            vec![
                text(&d["id"]),
                text(&d["dead_lettered_at"]),
                text(&d["service"]),
                format!("{}/{}@{}", text(&d["source_topic"]), text(&d["source_partition"]), text(&d["source_offset"])),
                text(&d["reason"]),
                error,
                match d["replayed"].as_object() {
                    Some(r) => format!("{} by {}", text(&r["replayed_at"]), text(&r["actor"])),
                    None => String::new(),
                },
            ]
        }),
    );
    out.push_str(&format!("\n{} dead letter(s)", text(&page["count"])));
    out
}

fn render_replay(result: &Value) -> String {
    let mut out = table(
        &["ID", "RESULT", "DETAIL"],
        result["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| vec![text(&i["id"]), text(&i["result"]), text(&i["detail"])]),
    );
    out.push_str(&format!(
        "\n{}replayed {}, skipped {}",
        if result["dry_run"] == true { "dry run: " } else { "" },
        text(&result["replayed"]),
        text(&result["skipped"])
    ));
    out
}

async fn run(cli: Cli) -> Result<String, Failure> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(cli.timeout))
        .build()
        .map_err(|e| Failure { code: 1, message: e.to_string() })?;
    let client = Client { http, base: cli.url.trim_end_matches('/').to_owned(), token: cli.token.clone() };
    let new_key = || format!("sagactl-{}", uuid::Uuid::new_v4());
    let (body, render): (Value, fn(&Value) -> String) = match cli.command {
        Command::List { filter, limit, cursor } => {
            let mut query = filter.pairs();
            query.push(("limit", limit.to_string()));
            if let Some(cursor) = cursor {
                query.push(("cursor", cursor));
            }
            (client.get("/api/v1/sagas", &query).await?, render_list)
        }
        Command::Show { id } => (client.get(&format!("/api/v1/sagas/{id}"), &[]).await?, render_saga),
        Command::Stats { window, from, to, saga_type } => {
            let query: Vec<(&str, String)> = [("window", window), ("from", from), ("to", to), ("saga_type", saga_type)]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect();
            (client.get("/api/v1/sagas/stats", &query).await?, render_stats)
        }
        Command::Retry(action) => {
            let key = action.idempotency_key.unwrap_or_else(new_key);
            let path = format!("/api/v1/sagas/{}/retry", action.id);
            (client.post(&path, &json!({"reason": action.reason}), Some(&key)).await?, render_action)
        }
        Command::Abort(action) => {
            let key = action.idempotency_key.unwrap_or_else(new_key);
            let path = format!("/api/v1/sagas/{}/abort", action.id);
            (client.post(&path, &json!({"reason": action.reason}), Some(&key)).await?, render_action)
        }
        Command::BulkRetry { filter, limit, reason, dry_run, idempotency_key } => {
            let body = json!({"filter": filter.json(), "limit": limit, "reason": reason, "dry_run": dry_run});
            let key = idempotency_key.unwrap_or_else(new_key);
            (client.post("/api/v1/sagas/bulk-retry", &body, Some(&key)).await?, render_bulk)
        }
        Command::Audit { id } => (client.get(&format!("/api/v1/sagas/{id}/audit"), &[]).await?, render_audit),
        Command::Definitions => (client.get("/api/v1/saga-definitions", &[]).await?, render_definitions),
        Command::Retention => (client.get("/api/v1/retention", &[]).await?, render_retention),
        Command::Dlq(Dlq::List { topic, reason, pending, replayed, limit }) => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(topic.map(|t| ("topic", t)));
            query.extend(reason.map(|r| ("reason", r)));
            if pending || replayed {
                query.push(("replayed", replayed.to_string()));
            }
            (client.get("/api/v1/dead-letters", &query).await?, render_dead_letters)
        }
        Command::Dlq(Dlq::Replay { ids, all, topic, reason_code, reason, force, dry_run }) => {
            let body = json!({"ids": ids, "all": all, "topic": topic, "reason_code": reason_code,
                "reason": reason, "force": force, "dry_run": dry_run});
            (client.post("/api/v1/dead-letters/replay", &body, None).await?, render_replay)
        }
    };
    Ok(match cli.output {
        Output::Json => serde_json::to_string_pretty(&body).unwrap_or_default(),
        Output::Table => render(&body),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("sagactl: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `sagactl ...` command in `text`, as the words a shell would pass: up to an unquoted
    /// `;`, `,`, the end of the YAML string, or a full stop that ends a sentence. Alert
    /// templates (`{{ $labels.topic }}`) stand for a word; `<id>` for a saga id.
    fn commands(text: &str) -> Vec<Vec<String>> {
        let text = text.replace("<id>", "01a22f16-47d9-7324-82da-8da1f19a77a3");
        let mut text = text.as_str().to_owned();
        while let (Some(start), Some(end)) = (text.find("{{"), text.find("}}")) {
            text.replace_range(start..end + 2, "x");
        }
        let mut found = Vec::new();
        for (at, _) in text.match_indices("sagactl ") {
            let rest: Vec<char> = text[at..].chars().collect();
            let (mut words, mut word, mut quoted) = (Vec::new(), String::new(), false);
            for (i, c) in rest.iter().copied().enumerate() {
                let ends_sentence = c == '.' && rest.get(i + 1).is_none_or(|n| n.is_whitespace() || *n == '"');
                match c {
                    '\'' => quoted = !quoted,
                    _ if quoted => word.push(c),
                    ';' | ',' | '"' | '\n' => break,
                    _ if ends_sentence => break,
                    c if c.is_whitespace() => {
                        if !word.is_empty() {
                            words.push(std::mem::take(&mut word));
                        }
                    }
                    c => word.push(c),
                }
            }
            if !word.is_empty() {
                words.push(word);
            }
            found.push(words);
        }
        found
    }

    #[test]
    fn every_sagactl_command_the_alerts_name_is_one_sagactl_accepts() {
        let rules = include_str!("../../../k8s/components/monitoring/prometheus-rules.yaml");
        let commands = commands(rules);
        assert!(commands.len() >= 5, "the alerts name sagactl commands: {commands:?}");
        for words in commands {
            if let Err(error) = Cli::try_parse_from(&words) {
                panic!("an alert tells on-call to run {:?}, which sagactl refuses:\n{error}", words.join(" "));
            }
        }
    }

    #[test]
    fn the_words_of_a_command_in_prose_are_found() {
        let prose = "Which step: sagactl list --status FAILED --since 1h; sagactl stats. Then sagactl retry <id> \
                     --reason 'fixed it.'. And sagactl dlq list --topic {{ $labels.topic }}, once.";
        assert_eq!(
            commands(prose),
            vec![
                vec!["sagactl", "list", "--status", "FAILED", "--since", "1h"],
                vec!["sagactl", "stats"],
                vec!["sagactl", "retry", "01a22f16-47d9-7324-82da-8da1f19a77a3", "--reason", "fixed it."],
                vec!["sagactl", "dlq", "list", "--topic", "x"],
            ]
        );
    }

    #[test]
    fn since_asks_for_what_changed_within_that_long() {
        let cli = Cli::try_parse_from(["sagactl", "list", "--status", "FAILED", "--since", "1h"]).unwrap();
        let Command::List { filter, .. } = cli.command else { panic!("list") };
        let pairs = filter.pairs();
        let after = pairs.iter().find(|(name, _)| *name == "updated_after").expect("updated_after").1.clone();
        let after = chrono::DateTime::parse_from_rfc3339(&after).unwrap();
        let ago = chrono::Utc::now().signed_duration_since(after);
        assert!((3595..=3605).contains(&ago.num_seconds()), "{ago:?}");
        assert!(Cli::try_parse_from(["sagactl", "list", "--since", "0s"]).is_err());
        assert!(Cli::try_parse_from(["sagactl", "list", "--since", "1h", "--updated-after", "2026-01-01T00:00:00Z"])
            .is_err());
        assert!(Cli::try_parse_from(["sagactl", "list", "--stuck", "10m"]).is_ok());
    }
}
