//! Connection strings as secrets: `${VAR}` expansion and a type that never prints its content.

use std::fmt;

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

/// Why `${VAR}` expansion failed. Never carries the surrounding text (it may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("environment variable ${{{0}}} is not set")]
    Missing(String),
    #[error("unterminated ${{ in connection string")]
    Unterminated,
    #[error("invalid variable name in ${{...}}: {0:?}")]
    BadName(String),
}

/// Expands `${VAR}` and `${VAR:-default}` from `lookup`. Only the braced form is special:
/// `$VAR` and `$$` stay literal.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ExpandError::Unterminated)?;
        let inner = &after[..end];
        // `${VAR:-default}`: the default applies when VAR is unset (as in POSIX shells).
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(ExpandError::BadName(name.to_string()));
        }
        let value = lookup(name)
            .or_else(|| default.map(str::to_string))
            .ok_or_else(|| ExpandError::Missing(name.to_string()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PW" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_table() {
        let cases: &[(&str, Result<&str, ExpandError>)] = &[
            ("postgres://a:${PW}@h/db", Ok("postgres://a:s3cret@h/db")),
            ("no vars", Ok("no vars")),
            ("${PW}${PW}", Ok("s3crets3cret")),
            ("x${EMPTY}y", Ok("xy")),
            ("$PW stays", Ok("$PW stays")),
            ("${NOPE}", Err(ExpandError::Missing("NOPE".into()))),
            ("${PW", Err(ExpandError::Unterminated)),
            ("${}", Err(ExpandError::BadName(String::new()))),
            ("${1A}", Err(ExpandError::BadName("1A".into()))),
            ("${A-B}", Err(ExpandError::BadName("A-B".into()))),
            ("h:${PORT:-5432}", Ok("h:5432")),
            ("${PW:-x}", Ok("s3cret")),
            ("${NOPE:-}", Ok("")),
        ];
        for (input, want) in cases {
            let got = expand(input, env);
            assert_eq!(got.as_deref().map_err(Clone::clone), want.clone().as_deref().map_err(Clone::clone), "{input}");
        }
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("postgres://u:canary@h/db".into());
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert!(s.expose().contains("canary"));
    }
}
