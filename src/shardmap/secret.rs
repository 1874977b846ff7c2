//! Connection strings as secrets: a type that never prints its content. The `${VAR}` and
//! `${file:/path}` expansion lives in `crate::secrets` (config values use it too) and is
//! re-exported here for the map compiler.

use std::fmt;

pub use crate::secrets::{ExpandError, expand, read_secret_file};

/// A connection string that may hold a password. Debug, Display and Serialize print `***`;
/// only [`Secret::expose`] gives the text, and only backends call it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }

    /// The clear text. Callers must not log, format or return it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("postgres://u:canary@h/db".into());
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert!(s.expose().contains("canary"));
    }
}
