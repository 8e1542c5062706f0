//! Every service's `migrate` command: what a Kubernetes Job runs before a rollout (k8s/), so that
//! the replicas start with `DATABASE_MIGRATE=false` and need no right to change the schema.

use std::path::Path;

use saga_e2e::{binary, postgres_url, SERVICES};
use sqlx::{Connection, PgConnection};

/// The migration files a service's database gets: the outbox's, the participants' dedupe
/// records (participants only) and its own.
fn migration_files(service: &str) -> usize {
    let root = saga_e2e::workspace_root().join("migrations");
    let sets: Vec<&str> = match service {
        "orchestrator" | "notification" => vec!["outbox", service],
        participant => vec!["outbox", "participant", participant],
    };
    sets.iter()
        .map(|set| {
            std::fs::read_dir(root.join(set))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
                .count()
        })
        .sum()
}

async fn drop_database(name: &str) {
    let mut admin = PgConnection::connect(&postgres_url("postgres")).await.unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await.unwrap();
}

#[tokio::test]
async fn every_service_creates_and_migrates_its_database_with_migrate_whatever_database_migrate_says() {
    let run = uuid::Uuid::new_v4().simple().to_string();
    for service in SERVICES {
        let name = format!("sagatest_migrate_{}_{service}", &run[..10]);
        let url = postgres_url(&name);
        let run_migrate = || {
            tokio::process::Command::new(binary(service))
                .arg("migrate")
                .env("DATABASE_URL", &url)
                .env("DATABASE_MIGRATE", "false")
                .env("LOG_LEVEL", "warn")
                // Nothing of Kafka is needed: a broker nobody listens on proves it.
                .env("KAFKA_BROKERS", "127.0.0.1:1")
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
                .output()
        };
        let output = run_migrate().await.unwrap();
        assert!(output.status.success(), "{service} migrate: {}", String::from_utf8_lossy(&output.stderr));
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(applied as usize, migration_files(service), "{service}: every migration applied");
        // Again: nothing left to do, and no error.
        let again = run_migrate().await.unwrap();
        assert!(again.status.success(), "{service} migrate again: {}", String::from_utf8_lossy(&again.stderr));
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&mut conn).await.unwrap();
        assert_eq!(outbox, 0);
        conn.close().await.unwrap();
        drop_database(&name).await;
    }
}
