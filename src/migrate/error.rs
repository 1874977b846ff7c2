//! The migration module's errors and their one classification (who is at fault, may the same
//! request be retried). Mapped to HTTP only in `http/respond.rs`; nothing here knows HTTP.

/// Who caused a migration error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request (or the map it names) is wrong, or conflicts with the migration's state.
    Caller,
    /// A shard's server refused or could not be reached.
    Shard,
    /// This process (reload loop stopped, test failpoint).
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no such migration")]
    NotFound,
    #[error("shard {shard} unavailable: {reason}")]
    ShardUnavailable { shard: String, reason: String },
    /// A statement failed on a shard: the server's own message and SQLSTATE, never the bare
    /// "db error" of the driver's `Display`.
    #[error("{step}: {message}{}", sqlstate.as_ref().map(|s| format!(" (SQLSTATE {s})")).unwrap_or_default())]
    Database { step: String, sqlstate: Option<String>, message: String },
    /// Publishing the new map failed (rejected, conflicting version, reload loop stopped).
    #[error("{0}")]
    Publish(String),
    #[error("aborted by operator")]
    Aborted,
    /// A step through etcd failed (fleet mode): unreachable, or instances did not acknowledge.
    #[error("fleet: {0}")]
    Fleet(String),
    /// etcd mode: another instance took this migration over (its record names that instance);
    /// this orchestrator stops where it is and persists nothing more.
    #[error("instance {0} took this migration over; this orchestrator stopped")]
    Deposed(String),
    /// Test hook: the orchestrator stops here as a crashed process would.
    #[error("failpoint")]
    Failpoint,
}

impl MigrateError {
    /// (who is at fault, may the same request succeed later unchanged)
    pub fn class(&self) -> (Fault, bool) {
        use MigrateError::*;
        match self {
            InvalidRequest(_) | Unsupported(_) | Conflict(_) | NotFound | Aborted => (Fault::Caller, false),
            ShardUnavailable { .. } => (Fault::Shard, true),
            // Class 08 (connection), 40 (serialization, deadlock), 53 (resources), 57 (operator
            // intervention, e.g. shutdown): the same step may pass on a later try.
            Database { sqlstate, .. } => {
                let transient =
                    sqlstate.as_deref().is_some_and(|s| ["08", "40", "53", "57"].iter().any(|c| s.starts_with(c)));
                (Fault::Shard, transient)
            }
            Publish(_) | Failpoint | Deposed(_) => (Fault::Server, false),
            Fleet(_) => (Fault::Server, true),
        }
    }

    /// A failed statement of `step`, keeping PostgreSQL's message and SQLSTATE.
    pub fn pg(step: impl Into<String>, e: &tokio_postgres::Error) -> Self {
        let step = step.into();
        match e.as_db_error() {
            Some(d) => MigrateError::Database {
                step,
                sqlstate: Some(d.code().code().to_string()),
                message: match d.detail() {
                    Some(detail) => format!("{} ({detail})", d.message()),
                    None => d.message().to_string(),
                },
            },
            None => MigrateError::Database { step, sqlstate: None, message: e.to_string() },
        }
    }

    /// The same error with every occurrence of a secret (a connection password) masked: errors
    /// are persisted on the shards and shown by the admin API.
    pub fn redacted(self, secrets: &[String]) -> Self {
        let mask = |s: String| secrets.iter().filter(|x| x.len() >= 3).fold(s, |s, x| s.replace(x.as_str(), "***"));
        use MigrateError::*;
        match self {
            InvalidRequest(m) => InvalidRequest(mask(m)),
            Unsupported(m) => Unsupported(mask(m)),
            Conflict(m) => Conflict(mask(m)),
            ShardUnavailable { shard, reason } => ShardUnavailable { shard, reason: mask(reason) },
            Database { step, sqlstate, message } => Database { step, sqlstate, message: mask(message) },
            Publish(m) => Publish(mask(m)),
            Fleet(m) => Fleet(mask(m)),
            e @ (NotFound | Aborted | Failpoint | Deposed(_)) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_keep_the_server_message_and_sqlstate() {
        let e = MigrateError::Database {
            step: "target cleanup of items".into(),
            sqlstate: Some("42501".into()),
            message: "permission denied to set parameter \"session_replication_role\"".into(),
        };
        assert_eq!(
            e.to_string(),
            "target cleanup of items: permission denied to set parameter \"session_replication_role\" (SQLSTATE 42501)"
        );
        assert_eq!(e.class(), (Fault::Shard, false));
        let t = MigrateError::Database { step: "x".into(), sqlstate: Some("40P01".into()), message: "deadlock".into() };
        assert_eq!(t.class(), (Fault::Shard, true));
    }

    #[test]
    fn redaction_masks_passwords() {
        let e = MigrateError::ShardUnavailable { shard: "a".into(), reason: "password=s3cret rejected".into() };
        assert_eq!(e.redacted(&["s3cret".into()]).to_string(), "shard a unavailable: password=*** rejected");
        assert_eq!(MigrateError::NotFound.class(), (Fault::Caller, false));
    }
}
