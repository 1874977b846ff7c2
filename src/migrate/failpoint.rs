//! Test hook (cargo feature `failpoints`, enabled for this crate's tests through its
//! dev-dependency on itself): stop the orchestrator once at a named step, exactly as a crash of
//! the process would leave things. Without the feature `hit` is a no-op the optimiser removes.

use super::MigrateError;

#[cfg(feature = "failpoints")]
static ARMED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Stop the orchestrator once at step `name` (`after_fence`). Also armed by
/// `CELLGATE_FAILPOINT=<name>` at the first step.
#[cfg(feature = "failpoints")]
pub fn arm_failpoint(name: &str) {
    *ARMED.lock().expect("failpoint") = Some(name.to_string());
}

#[cfg(feature = "failpoints")]
pub(super) fn hit(name: &str) -> Result<(), MigrateError> {
    static ENV_READ: std::sync::Once = std::sync::Once::new();
    ENV_READ.call_once(|| {
        if let Ok(v) = std::env::var("CELLGATE_FAILPOINT") {
            arm_failpoint(&v);
        }
    });
    let mut armed = ARMED.lock().expect("failpoint");
    if armed.as_deref() == Some(name) {
        *armed = None;
        return Err(MigrateError::Failpoint);
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
pub(super) fn hit(_name: &str) -> Result<(), MigrateError> {
    Ok(())
}
