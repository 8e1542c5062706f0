//! The Postgres pool and migrations.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::{Arguments, PgPool, Postgres};

use crate::config::DatabaseConfig;

/// The outbox table every service has.
pub fn outbox_migrations() -> Migrator {
    sqlx::migrate!("../../migrations/outbox")
}

/// The tables of the participant runtime (processed commands).
pub fn participant_migrations() -> Migrator {
    sqlx::migrate!("../../migrations/participant")
}

/// Connects to the service's database, creating and migrating it first when configured to.
/// Several migration sets share one database, each with its own version range, so each runs with
/// `ignore_missing`.
pub async fn connect(config: &DatabaseConfig, migrations: Vec<Migrator>) -> anyhow::Result<PgPool> {
    let url = config.database_url.expose_secret();
    let options: PgConnectOptions =
        url.parse().map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {e}"))?;
    if config.database_migrate && !Postgres::database_exists(url).await? {
        match Postgres::create_database(url).await {
            Ok(()) => tracing::info!(database = options.get_database().unwrap_or(""), "created database"),
            // Another replica may have created it in the meantime.
            Err(error) if Postgres::database_exists(url).await.unwrap_or(false) => {
                tracing::debug!(%error, "database appeared while creating it")
            }
            Err(error) => return Err(error.into()),
        }
    }
    let pool = PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .min_connections(config.database_min_connections.min(config.database_max_connections))
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    if config.database_migrate {
        for mut migrator in migrations {
            migrator.set_ignore_missing(true);
            migrator.run(&pool).await?;
        }
    }
    Ok(pool)
}

/// Creates the database if needed and applies `migrations`, whatever `DATABASE_MIGRATE` says (the
/// `migrate` command of every service).
pub async fn migrate(config: &DatabaseConfig, migrations: Vec<Migrator>) -> anyhow::Result<()> {
    let config = DatabaseConfig { database_migrate: true, ..config.clone() };
    connect(&config, migrations).await?.close().await;
    Ok(())
}

/// The parameters of a statement assembled from parts (several CTEs in one round trip), each
/// part numbering its placeholders by adding its values in the order it writes them.
#[derive(Default)]
pub struct Params(PgArguments);

impl Params {
    /// Adds a parameter and returns its placeholder (`$n`).
    pub fn add<'q, T>(&mut self, value: T) -> sqlx::Result<String>
    where
        T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
    {
        self.0.add(value).map_err(sqlx::Error::Encode)?;
        Ok(format!("${}", self.0.len()))
    }

    /// `sql` with these parameters.
    pub fn query(self, sql: &str) -> sqlx::query::Query<'_, Postgres, PgArguments> {
        sqlx::query_with(sql, self.0)
    }

    /// `sql` with these parameters, returning rows as `O`.
    pub fn query_as<O>(self, sql: &str) -> sqlx::query::QueryAs<'_, Postgres, O, PgArguments>
    where
        O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_as_with(sql, self.0)
    }

    /// `sql` with these parameters, returning one column.
    pub fn query_scalar<O>(self, sql: &str) -> sqlx::query::QueryScalar<'_, Postgres, O, PgArguments>
    where
        O: Send + Unpin,
        (O,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_scalar_with(sql, self.0)
    }
}

/// The URL of database `database` on the test server (`TEST_POSTGRES_URL`, or the local one),
/// for the services' tests.
pub fn test_url(database: &str) -> String {
    let url = std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    match url.split_once('?') {
        Some((base, query)) => format!("{}/{database}?{query}", base.trim_end_matches('/')),
        None => format!("{}/{database}", url.trim_end_matches('/')),
    }
}
