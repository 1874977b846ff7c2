//! What every bb8-pooled SQL endpoint (PostgreSQL, SQL Server) shares: the pool settings from
//! `[pool]`, the connect-error sink, the identity key across reloads, the meaning of a checkout
//! timeout, and a database's primary + replicas with the read rotation. Knows no driver; must not
//! classify driver errors or judge an endpoint's fitness (each backend does).

use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::BackendError;
use super::health::EndpointHealth;
use crate::config;
use crate::shardmap::Secret;

/// SHA-256 of a connection string: identifies an endpoint across reloads without keeping the
/// secret text around.
pub fn conn_key(conn: &Secret) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(conn.expose().as_bytes()).into()
}

/// A pool builder with the `[pool]` settings and a sink that logs the real reason behind a
/// failed connect (bb8 otherwise reports only a timeout). Neither driver's errors contain the
/// connection string.
pub fn builder<M>(cfg: &config::Pool, endpoint: &Arc<str>, health: &Arc<EndpointHealth>) -> bb8::Builder<M>
where
    M: bb8::ManageConnection,
    M::Error: Display,
{
    bb8::Pool::builder()
        .max_size(cfg.max_size)
        .min_idle(Some(cfg.min_idle))
        // Never bb8's 30 s default (crates.md P5): a dead shard must answer fast.
        .connection_timeout(Duration::from_millis(cfg.checkout_timeout_ms))
        .max_lifetime(Some(Duration::from_secs(cfg.max_lifetime_s)))
        .idle_timeout(Some(Duration::from_secs(cfg.idle_timeout_s)))
        // has_broken covers closed and abandoned connections; a test query per checkout would
        // double the round trips of every read.
        .test_on_check_out(false)
        .error_sink(Box::new(ConnectSink { endpoint: endpoint.clone(), health: health.clone() }))
}

#[derive(Debug, Clone)]
struct ConnectSink {
    endpoint: Arc<str>,
    health: Arc<EndpointHealth>,
}

impl<E: Display> bb8::ErrorSink<E> for ConnectSink {
    fn sink(&self, e: E) {
        tracing::warn!(endpoint = %self.endpoint, error = %e, "pool connect failed");
        self.health.note_error(&e.to_string());
    }
    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(self.clone())
    }
}

/// No pooled connection within the checkout timeout: a busy endpoint that is up is overloaded
/// (429); one the prober sees down is unavailable (503).
pub fn checkout_timed_out(endpoint: &str, health: &EndpointHealth, waited: Duration) -> BackendError {
    if health.is_up() {
        BackendError::Overloaded { endpoint: endpoint.to_string() }
    } else {
        BackendError::Unavailable { endpoint: endpoint.to_string(), reason: format!("no connection within {waited:?}") }
    }
}

/// A logical SQL database on one shard: its primary and replicas (`E`: the backend's endpoint).
pub struct ReplicaSet<E> {
    pub primary: Arc<E>,
    pub replicas: Vec<Arc<E>>,
    next: AtomicUsize,
}

impl<E> ReplicaSet<E> {
    pub fn new(primary: Arc<E>, replicas: Vec<Arc<E>>) -> Self {
        Self { primary, replicas, next: AtomicUsize::new(0) }
    }

    /// The first replica `fit` accepts, starting from the next one in rotation so load spreads.
    /// Never "unban all": `None` sends the read to the primary.
    pub fn pick_replica_where(&self, fit: impl Fn(&E) -> bool) -> Option<Arc<E>> {
        let n = self.replicas.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| &self.replicas[(start + i) % n]).find(|r| fit(r)).cloned()
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<E>> {
        std::iter::once(&self.primary).chain(self.replicas.iter())
    }
}
