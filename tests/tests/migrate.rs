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

/// A migration, once committed, never changes: a database that applied it refuses to start
/// ("migration 1009 was previously applied but has been modified"), which is what a comment
/// edited in 1009 did to the demo's database and to CI (2026-12-04). Every file is held to the
/// checksum sqlx records for it, listed in migrations/checksums.sha384.
#[tokio::test]
async fn no_committed_migration_changes_and_every_one_is_listed() {
    let root = saga_e2e::workspace_root().join("migrations");
    let listed: std::collections::BTreeMap<String, String> = std::fs::read_to_string(root.join("checksums.sha384"))
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .fold(std::collections::BTreeMap::new(), |mut listed, line| {
            let (file, sum) = line.split_once(' ').unwrap_or_else(|| panic!("not `<file> <sha384>`: {line:?}"));
            let sum = sum.trim();
            assert!(
                sum.len() == 96 && sum.bytes().all(|b| b.is_ascii_hexdigit()),
                "not `<file> <sha384>` (96 hex digits): {line:?}"
            );
            assert!(listed.insert(file.to_string(), sum.to_string()).is_none(), "{file} is listed twice");
            listed
        });
    let mut found = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for set in std::fs::read_dir(&root).unwrap() {
        let set = set.unwrap();
        if !set.file_type().unwrap().is_dir() {
            continue;
        }
        let name = set.file_name().to_string_lossy().into_owned();
        // As the services resolve them: the same parsing and the same checksum as sqlx::migrate!.
        let migrator = sqlx::migrate::Migrator::new(set.path()).await.unwrap();
        // Each file by the version its name starts with, as sqlx reads it (`0101_x.sql` is 101).
        let files: std::collections::HashMap<i64, String> = std::fs::read_dir(set.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".sql"))
            .filter_map(|f| Some((f.split_once('_')?.0.parse().ok()?, f)))
            .collect();
        for migration in migrator.iter() {
            let file = files
                .get(&migration.version)
                .unwrap_or_else(|| panic!("{name}: no file for migration {}", migration.version));
            let key = format!("{name}/{file}");
            let sum: String = migration.checksum.iter().map(|b| format!("{b:02x}")).collect();
            match listed.get(&key) {
                None => {
                    problems.push(format!("{key} is not listed; append to migrations/checksums.sha384:\n{key} {sum}"))
                }
                Some(expected) if *expected != sum => problems.push(format!(
                    "{key} changed after it was committed (databases that applied it would refuse to start): \
                     restore it and put the change in a new migration"
                )),
                Some(_) => {}
            }
            found.insert(key);
        }
    }
    for key in listed.keys().filter(|k| !found.contains(*k)) {
        problems.push(format!("{key} is listed but gone: a database that applied it refuses the set without it"));
    }
    assert!(found.len() >= 20, "only {} migrations found under {}", found.len(), root.display());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
