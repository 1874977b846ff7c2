//! Every background task is spawned here, under a name: it runs inside a `task{name}` span (so
//! its logs say which task spoke) and is counted in `cellgate_tasks{task}` while it runs. The
//! caller keeps the handle and owns the task's end (abort on drop, or await on shutdown); a
//! task whose owner can end it no other way is tied to a resource that ends it (a connection
//! task ends when its client is dropped).

use std::future::Future;

use tokio::task::JoinHandle;
use tracing::Instrument;

/// Decrements the running gauge however the task ends (completion, panic, abort).
struct Running(&'static str);

impl Drop for Running {
    fn drop(&mut self) {
        metrics::gauge!(crate::telemetry::names::TASKS, "task" => self.0).decrement(1.0);
    }
}

/// Spawn `fut` as the task `name` (a fixed string: it is a metric label).
pub fn spawn<F>(name: &'static str, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    metrics::gauge!(crate::telemetry::names::TASKS, "task" => name).increment(1.0);
    let guard = Running(name);
    tokio::spawn(
        async move {
            let _guard = guard;
            fut.await
        }
        .instrument(tracing::info_span!("task", name)),
    )
}
