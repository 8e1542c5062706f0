//! TLS and SASL end to end. The test makes its own certificate authority, starts a Postgres server
//! with `ssl=on` that refuses plaintext connections and a private Apache Kafka broker with
//! `SASL_SSL` (SCRAM-SHA-512 and PLAIN) and `SSL` (client certificates required) listeners, then:
//! - runs the happy path with every service on `sslmode=verify-full` and `SASL_SSL` SCRAM-SHA-512;
//! - shows that a wrong password, an untrusted CA and a plaintext client each end the start-up
//!   with a clear error and a non-zero exit, on both sides;
//! - shows that no secret appears in any log, error or `--help` output.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use saga_e2e::{binary, free_port, order_body, Options, System};

/// Environment variables of one run of a service.
type Env = Vec<(&'static str, String)>;

const DB_PASSWORD: &str = "pg-Secret-7f3a9c";
const SCRAM_USER: &str = "saga";
const SCRAM_PASSWORD: &str = "scram-Secret-51d2e8";
const PLAIN_USER: &str = "saga-plain";
const PLAIN_PASSWORD: &str = "plain-Secret-0c4b6a";

/// A certificate authority and what it signed, as PEM files in one folder.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for `localhost` and 127.0.0.1, a client certificate, and a
    /// second CA that signed nothing here (the "untrusted" one).
    fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca = authority("saga test CA")?;
        let other = authority("some other CA")?;
        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server.distinguished_name.push(DnType::CommonName, "localhost");
        let server = server.signed_by(&server_key, &ca)?;
        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, "saga-client");
        let client = client.signed_by(&client_key, &ca)?;
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text);
        write("ca.pem", &ca.pem())?;
        write("other-ca.pem", &other.pem())?;
        write("server.crt", &server.pem())?;
        write("server.key", &server_key.serialize_pem())?;
        // Kafka's PEM key store: the private key, then the certificate chain.
        write("broker.pem", &format!("{}{}", server_key.serialize_pem(), server.pem()))?;
        write("client.crt", &client.pem())?;
        write("client.key", &client_key.serialize_pem())?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn authority(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A Postgres server of the test's own, run by the `postgres` user from a folder under /tmp:
/// `ssl=on` with the test CA's server certificate, SCRAM passwords, and plaintext refused.
struct TlsPostgres {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
}

impl TlsPostgres {
    fn start(pki: &Pki, root: &Path) -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("no PostgreSQL server under /usr/lib/postgresql (scripts/test installs it)")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql/*/bin")?;
        std::fs::create_dir_all(root)?;
        let data = root.join("data");
        std::fs::write(root.join("password"), DB_PASSWORD)?;
        run(["chown", "-R", "postgres:postgres", &root.display().to_string()])?;
        as_postgres([
            &bin.join("initdb").display().to_string(),
            "-D",
            &data.display().to_string(),
            "-U",
            "postgres",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            &format!("--pwfile={}", root.join("password").display()),
        ])?;
        std::fs::copy(pki.dir.join("server.crt"), data.join("server.crt"))?;
        std::fs::copy(pki.dir.join("server.key"), data.join("server.key"))?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n\
             hostnossl all all 0.0.0.0/0 reject\n\
             hostnossl all all ::/0 reject\n",
        )?;
        let data_path = data.display().to_string();
        run(["chown", "-R", "postgres:postgres", &data_path])?;
        run(["chmod", "0600", &data.join("server.key").display().to_string()])?;
        let port = free_port();
        let options = format!(
            "-p {port} -c listen_addresses=localhost -c unix_socket_directories={} -c ssl=on \
             -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c max_connections=200 -c fsync=off",
            root.display()
        );
        let log = root.join("postgres.log").display().to_string();
        as_postgres([
            &bin.join("pg_ctl").display().to_string(),
            "-D",
            &data_path,
            "-o",
            &options,
            "-l",
            &log,
            "-w",
            "start",
        ])?;
        Ok(Self { port, bin, data })
    }

    /// The server URL (no database) and the query string of a `verify-full` connection.
    fn verify_full(&self, pki: &Pki) -> (String, String) {
        (
            format!("postgres://postgres:{DB_PASSWORD}@localhost:{}", self.port),
            format!("?sslmode=verify-full&sslrootcert={}", pki.path("ca.pem")),
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let _ = as_postgres([&pg_ctl, "-D", &self.data.display().to_string(), "-m", "immediate", "stop"]);
    }
}

/// Runs a command as the `postgres` user (Postgres refuses to run as root).
fn as_postgres<const N: usize>(args: [&str; N]) -> anyhow::Result<()> {
    let mut command = std::process::Command::new("runuser");
    command.args(["-u", "postgres", "--"]).args(args);
    finish(command, &args)
}

/// Runs a command as ourselves (root).
fn run<const N: usize>(args: [&str; N]) -> anyhow::Result<()> {
    let mut command = std::process::Command::new(args[0]);
    command.args(&args[1..]);
    finish(command, &args)
}

fn finish(mut command: std::process::Command, args: &[&str]) -> anyhow::Result<()> {
    let output = command.stdin(Stdio::null()).output().with_context(|| format!("running {args:?}"))?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The broker's listeners and settings: SASL_SSL (SCRAM-SHA-512 and PLAIN) and SSL with client
/// certificates required, both with the test CA's server certificate.
fn secured_broker(options: Options, pki: &Pki, sasl_port: u16, ssl_port: u16) -> Options {
    Options {
        private_broker: true,
        broker_listeners: vec![
            (format!("SASL_SSL://127.0.0.1:{sasl_port}"), format!("SASL_SSL://localhost:{sasl_port}")),
            (format!("SSL://127.0.0.1:{ssl_port}"), format!("SSL://localhost:{ssl_port}")),
        ],
        broker_properties: vec![
            "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN".to_owned(),
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;".to_owned(),
            format!(
                "listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_{PLAIN_USER}=\"{PLAIN_PASSWORD}\";"
            ),
            "ssl.keystore.type=PEM".to_owned(),
            format!("ssl.keystore.location={}", pki.path("broker.pem")),
            "ssl.truststore.type=PEM".to_owned(),
            format!("ssl.truststore.location={}", pki.path("ca.pem")),
            "listener.name.ssl.ssl.client.auth=required".to_owned(),
        ],
        broker_scram: vec![format!("SCRAM-SHA-512=[name={SCRAM_USER},password={SCRAM_PASSWORD}]")],
        ..options
    }
}

/// The Kafka settings of a SASL_SSL SCRAM-SHA-512 client trusting `ca`.
fn scram_properties(pki: &Pki, ca: &str) -> String {
    format!(
        "security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512,sasl.username={SCRAM_USER},ssl.ca.location={}",
        pki.path(ca)
    )
}

/// Runs one service binary with `env` until it exits (at most 90 s): (exit code, output).
async fn run_service(service: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<(Option<i32>, String)> {
    let mut command = tokio::process::Command::new(binary(service));
    command
        .args(args)
        .env("HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("PROFILE_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .env("AUTH_DISABLED", "true")
        .env("KAFKA_CONNECT_TIMEOUT_MS", "60000")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .with_context(|| format!("{service} {args:?} neither started nor exited within 90 s"))??;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{service} {args:?} exited {:?} after {:?}", output.status.code(), started.elapsed());
    Ok((output.status.code(), text))
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [DB_PASSWORD, SCRAM_PASSWORD, PLAIN_PASSWORD] {
        assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
    }
}

#[tokio::test]
async fn the_order_saga_runs_over_verified_tls_to_postgres_and_sasl_ssl_to_kafka() -> anyhow::Result<()> {
    let root = PathBuf::from(format!("/tmp/saga-tls-{}", uuid::Uuid::new_v4().simple()));
    let pki = Pki::create(&root.join("pki"))?;
    let postgres = TlsPostgres::start(&pki, &root.join("postgres"))?;
    let (sasl_port, ssl_port) = (free_port(), free_port());
    let mut options = secured_broker(Options::default(), &pki, sasl_port, ssl_port);
    let (pg_server, pg_verify_full) = postgres.verify_full(&pki);
    options.postgres = Some((pg_server.clone(), pg_verify_full.clone()));
    for service in saga_e2e::SERVICES {
        options = options
            .env(service, "KAFKA_BROKERS", format!("localhost:{sasl_port}"))
            .env(service, "KAFKA_PROPERTIES", scram_properties(&pki, "ca.pem"))
            .env(service, "KAFKA_SASL_PASSWORD", SCRAM_PASSWORD);
    }
    let system = System::start_with(options).await?;

    // The happy path and a compensation, end to end.
    system.set_stock("TLS-1", 10).await?;
    let (status, good) = system.place_order("tls-good", &order_body("TLS-1", 2, "tok_visa", "62701")).await?;
    assert_eq!(status, 201, "{good}");
    let (_, declined) = system.place_order("tls-declined", &order_body("TLS-1", 1, "tok_declined", "62701")).await?;
    let good = system.wait_terminal(good["saga_id"].as_str().context("saga id")?, Duration::from_secs(60)).await?;
    let declined =
        system.wait_terminal(declined["saga_id"].as_str().context("saga id")?, Duration::from_secs(60)).await?;
    assert_eq!(good["status"], "COMPLETED", "{good:#}");
    assert_eq!(declined["status"], "FAILED", "{declined:#}");
    assert_eq!(system.stock("TLS-1").await?, 8, "two taken by the good order, the declined one's released");

    // Every connection of the services to Postgres is encrypted (plaintext ones are refused).
    let admin = sqlx::PgPool::connect(&format!("{pg_server}/postgres{pg_verify_full}")).await?;
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname LIKE $1",
    )
    .bind(format!("sagatest_{}_%", system.run_id))
    .fetch_one(&admin)
    .await?;
    assert!(encrypted >= 5 && plain == 0, "{encrypted} encrypted and {plain} plaintext connections");

    // A plaintext Postgres client is refused by the server itself.
    let refused = sqlx::PgPool::connect(&format!("{pg_server}/postgres?sslmode=disable")).await;
    assert!(refused.is_err(), "plaintext to Postgres must be refused");

    // Mutual TLS on the SSL listener and SASL PLAIN: topics created, exit 0.
    let mtls = [
        ("KAFKA_BROKERS", format!("localhost:{ssl_port}")),
        (
            "KAFKA_PROPERTIES",
            format!(
                "security.protocol=SSL,ssl.ca.location={},ssl.certificate.location={},ssl.key.location={}",
                pki.path("ca.pem"),
                pki.path("client.crt"),
                pki.path("client.key")
            ),
        ),
        ("KAFKA_TOPIC_PREFIX", format!("{}mtls.", system.run_id)),
    ];
    let (code, output) = run_service("orchestrator", &["create-topics"], &mtls).await?;
    assert_eq!(code, Some(0), "SSL with a client certificate:\n{output}");
    let no_client_certificate = [
        ("KAFKA_BROKERS", format!("localhost:{ssl_port}")),
        ("KAFKA_PROPERTIES", format!("security.protocol=SSL,ssl.ca.location={}", pki.path("ca.pem"))),
        ("KAFKA_TOPIC_PREFIX", format!("{}mtls.", system.run_id)),
    ];
    let (code, output) = run_service("orchestrator", &["create-topics"], &no_client_certificate).await?;
    assert_ne!(code, Some(0), "the SSL listener requires a client certificate:\n{output}");
    assert!(output.contains("refused this client's settings"), "{output}");
    let plain = [
        ("KAFKA_BROKERS", format!("localhost:{sasl_port}")),
        (
            "KAFKA_PROPERTIES",
            format!(
                "security.protocol=SASL_SSL,sasl.mechanism=PLAIN,sasl.username={PLAIN_USER},ssl.ca.location={}",
                pki.path("ca.pem")
            ),
        ),
        ("KAFKA_SASL_PASSWORD", PLAIN_PASSWORD.to_owned()),
        ("KAFKA_TOPIC_PREFIX", format!("{}plain.", system.run_id)),
    ];
    let (code, output) = run_service("orchestrator", &["create-topics"], &plain).await?;
    assert_eq!(code, Some(0), "SASL_SSL with PLAIN:\n{output}");
    assert_no_secret("create-topics with PLAIN", &output);

    // Settings the other side refuses end the start-up at once, with the reason, and no secret.
    let database = |query: &str| format!("{pg_server}/sagatest_{}_payment{query}", system.run_id);
    let good_database = database(&pg_verify_full);
    let kafka = |properties: String, password: &str| {
        vec![
            ("DATABASE_URL", good_database.clone()),
            ("KAFKA_BROKERS", format!("localhost:{sasl_port}")),
            ("KAFKA_PROPERTIES", properties),
            ("KAFKA_SASL_PASSWORD", password.to_owned()),
            ("KAFKA_TOPIC_PREFIX", system.topic_prefix()),
        ]
    };
    let cases: Vec<(&str, Env, &[&str])> = vec![
        (
            "a wrong SASL password",
            kafka(scram_properties(&pki, "ca.pem"), "not-the-password-123"),
            &["refused this client's settings", "Authentication failed"],
        ),
        (
            "a broker certificate from an untrusted CA",
            kafka(scram_properties(&pki, "other-ca.pem"), SCRAM_PASSWORD),
            &["refused this client's settings", "certificate verify failed"],
        ),
        (
            "a plaintext client at the SASL_SSL listener",
            kafka(String::new(), SCRAM_PASSWORD),
            &["refused this client's settings", "security.protocol"],
        ),
        (
            "a wrong Postgres password",
            vec![("DATABASE_URL", database(&pg_verify_full).replace(DB_PASSWORD, "wrong-pg-password"))],
            &["password authentication failed"],
        ),
        (
            "a Postgres certificate from an untrusted CA",
            vec![("DATABASE_URL", database(&format!("?sslmode=verify-full&sslrootcert={}", pki.path("other-ca.pem"))))],
            &["certificate"],
        ),
        ("a plaintext Postgres client", vec![("DATABASE_URL", database("?sslmode=disable"))], &["no encryption"]),
    ];
    for (case, env, expected) in cases {
        let (code, output) = run_service("payment", &[], &env).await?;
        assert!(code.is_some_and(|c| c != 0), "{case}: a non-zero exit, got {code:?}:\n{output}");
        for words in expected {
            assert!(output.contains(words), "{case}: the error says {words:?}:\n{output}");
        }
        assert_no_secret(case, &output);
    }

    // sslmode=require (encrypted, server not verified) is accepted too.
    let (code, output) = run_service(
        "orchestrator",
        &["migrate"],
        &[("DATABASE_URL", format!("{pg_server}/sagatest_{}_require?sslmode=require", system.run_id))],
    )
    .await?;
    assert_eq!(code, Some(0), "sslmode=require:\n{output}");

    // --help with every secret in the environment shows none of them.
    let everything = [
        ("DATABASE_URL", good_database.clone()),
        ("KAFKA_PROPERTIES", format!("{},sasl.password={SCRAM_PASSWORD}", scram_properties(&pki, "ca.pem"))),
        ("KAFKA_SASL_PASSWORD", SCRAM_PASSWORD.to_owned()),
        ("API_TOKENS", format!("a:admin:{PLAIN_PASSWORD}")),
    ];
    for service in ["orchestrator", "payment"] {
        let (code, help) = run_service(service, &["--help"], &everything).await?;
        assert_eq!(code, Some(0), "{help}");
        assert!(help.contains("KAFKA_SASL_PASSWORD") && help.contains("DATABASE_URL"), "{help}");
        assert_no_secret(&format!("{service} --help"), &help);
    }

    // And the running services' logs hold no secret either.
    for entry in std::fs::read_dir(saga_e2e::bin_dir().join("e2e-logs").join(&system.run_id))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") && !path.ends_with("kafka.log") {
            assert_no_secret(&path.display().to_string(), &std::fs::read_to_string(&path)?);
        }
    }
    system.stop().await?;
    drop(postgres);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
