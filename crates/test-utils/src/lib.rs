//! Test harness: every test gets its own PostgreSQL database and its own NATS
//! namespace on the real servers, so tests run in parallel and leave nothing
//! behind (cleanup runs on drop, also when the test panics).
//!
//! The servers default to the loopback ones `.ci/run` starts; override with
//! `FLOTILLA_TEST_DATABASE_URL` (a URL to an admin database) and
//! `FLOTILLA_TEST_NATS_URL`.
//!
//! Tests keep time themselves: [`wait`] polls a condition with a deadline,
//! [`clock`] ages rows past a deadline instead of sleeping through it.

pub mod clock;
pub mod fleet;
pub mod metrics;
pub mod python_client;
pub mod stack;
pub mod wait;

pub use clock::{age_instances, run_out_leases};
pub use wait::{
    DEADLINE, connections_closed, eventually, eventually_blocking, eventually_ok, eventually_some,
    lease_run_out, leases_run_out,
};

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use uuid::Uuid;

fn admin_url() -> String {
    std::env::var("FLOTILLA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The NATS server tests use.
pub fn nats_url() -> String {
    std::env::var("FLOTILLA_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").map_or(0, |p| p + 2) => {
            format!("{}/{}", &url[..i], db)
        }
        _ => format!("{url}/{db}"),
    }
}

/// Runs an async cleanup on its own thread and runtime: `Drop` cannot await,
/// and the test's runtime may already be shutting down.
fn cleanup_blocking<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(f());
        }
    });
    let _ = handle.join();
}

/// A freshly created and migrated database, dropped at the end of the test.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("flotilla_test_{}", Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let url = with_database(&admin, &name);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .expect("connect test database");
        flotilla_store::migrate(&pool).await.expect("migrate");
        TestDb { pool, url, name }
    }

    /// The database's URL for a service under test, its connections named
    /// `app` (PostgreSQL's `application_name`), so the test can see when
    /// that service holds none any more ([`wait::connections_closed`]).
    pub fn url_as(&self, app: &str) -> String {
        format!("{}?application_name={app}", self.url)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // The pool's connections are driven by the test's runtime, which is
        // blocked in this drop: FORCE terminates them instead of closing.
        let name = self.name.clone();
        cleanup_blocking(move || async move {
            if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    }
}

/// A private namespace on the real NATS server; its streams are deleted at
/// the end of the test.
pub struct TestNats {
    pub client: async_nats::Client,
    pub url: String,
    pub namespace: String,
}

impl TestNats {
    pub async fn new() -> TestNats {
        let url = nats_url();
        let client = async_nats::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach NATS at {url}: {e}"));
        let namespace = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
        TestNats {
            client,
            url,
            namespace,
        }
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = format!("{}_", self.namespace);
        cleanup_blocking(move || async move {
            let Ok(client) = async_nats::connect(&url).await else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            use futures::StreamExt;
            let mut names = js.stream_names();
            let mut ours = Vec::new();
            while let Some(Ok(name)) = names.next().await {
                if name.starts_with(&prefix) {
                    ours.push(name);
                }
            }
            for name in ours {
                let _ = js.delete_stream(&name).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_name_replaces_the_path() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
    }
}
