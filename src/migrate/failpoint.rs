//! Test hook (cargo feature `failpoints`, enabled for this crate's tests through its
//! dev-dependency on itself): stop the orchestrator once at a named step, exactly as a crash of
//! the process would leave things — or hang it there, for a test that then kills the process.
//! Without the feature `hit` is a no-op the optimiser removes.

use super::MigrateError;

#[cfg(feature = "failpoints")]
static ARMED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Stop the orchestrator once at step `name` (`after_fence`), as a crash would. Modes:
/// `name:hang` waits there forever instead (the process goes on serving and stays registered:
/// a hung orchestrator, which a test then kills with SIGKILL); `name:sleep=MS` pauses there and
/// then carries on as if nothing happened (a process stopped and resumed, e.g. SIGSTOP or a
/// long GC-like stall). Also armed by `CELLGATE_FAILPOINT=<name>[:mode]` at the first step.
#[cfg(feature = "failpoints")]
pub fn arm_failpoint(name: &str) {
    *ARMED.lock().expect("failpoint") = Some(name.to_string());
}

#[cfg(feature = "failpoints")]
pub(super) async fn hit(name: &str) -> Result<(), MigrateError> {
    static ENV_READ: std::sync::Once = std::sync::Once::new();
    ENV_READ.call_once(|| {
        if let Ok(v) = std::env::var("CELLGATE_FAILPOINT") {
            arm_failpoint(&v);
        }
    });
    let mode = {
        let mut armed = ARMED.lock().expect("failpoint");
        let Some(a) = armed.as_deref() else { return Ok(()) };
        let (at, mode) = a.split_once(':').unwrap_or((a, ""));
        if at != name {
            return Ok(());
        }
        let mode = mode.to_string();
        *armed = None;
        mode
    };
    if mode == "hang" {
        // The line a test waits for before it kills the process.
        tracing::warn!(failpoint = name, "failpoint: orchestrator hangs here");
        std::future::pending::<()>().await;
    }
    if let Some(ms) = mode.strip_prefix("sleep=").and_then(|ms| ms.parse::<u64>().ok()) {
        tracing::warn!(failpoint = name, ms, "failpoint: orchestrator paused");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        tracing::warn!(failpoint = name, "failpoint: orchestrator carries on");
        return Ok(());
    }
    Err(MigrateError::Failpoint)
}

#[cfg(not(feature = "failpoints"))]
pub(super) async fn hit(_name: &str) -> Result<(), MigrateError> {
    Ok(())
}
