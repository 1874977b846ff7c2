//! Bearer-token authentication: tokens configured by SHA-256 digest, scopes read/write/admin.
//! Never stores or logs a clear token.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::{Scope, Token};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No or unknown token: 401.
    Unauthorized,
    /// Known token without the scope: 403.
    Forbidden(Scope),
}

pub struct Auth {
    /// digest → (token name, scopes). Empty map = auth disabled.
    tokens: HashMap<[u8; 32], (String, Vec<Scope>)>,
}

impl Auth {
    pub fn new(tokens: &[Token]) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|t| {
                let d: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                Some((d, (t.name.clone(), t.scopes.clone())))
            })
            .collect();
        Self { tokens }
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Check an `Authorization` header value for `scope`. `write` implies `read` for data
    /// requests (a writer may read back); `admin` is separate and only valid on the admin listener.
    pub fn check(&self, header: Option<&[u8]>, scope: Scope) -> Result<Option<&str>, AuthError> {
        match self.identify(header)? {
            None => Ok(None),
            Some(id) if id.allows(scope) => Ok(Some(id.name)),
            Some(_) => Err(AuthError::Forbidden(scope)),
        }
    }

    /// The token a header names (`None` when auth is off), so one request can ask about several
    /// scopes with one digest.
    pub fn identify(&self, header: Option<&[u8]>) -> Result<Option<Identity<'_>>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        let token = header
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(AuthError::Unauthorized)?;
        // Lookup by digest: comparing digests, not tokens, leaks nothing useful through timing.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (name, scopes) = self.tokens.get(&digest).ok_or(AuthError::Unauthorized)?;
        Ok(Some(Identity { name, scopes }))
    }
}

/// A known token: its name and scopes.
pub struct Identity<'a> {
    pub name: &'a str,
    scopes: &'a [Scope],
}

impl Identity<'_> {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || (scope == Scope::Read && self.scopes.contains(&Scope::Write))
    }
}

/// Hex SHA-256 of a token, for writing configs (`cellgate token-hash`).
pub fn digest_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_table() {
        let t =
            |name: &str, tok: &str, scopes: Vec<Scope>| Token { name: name.into(), sha256: digest_hex(tok), scopes };
        let auth = Auth::new(&[
            t("r", "read-tok", vec![Scope::Read]),
            t("w", "write-tok", vec![Scope::Write]),
            t("a", "admin-tok", vec![Scope::Admin]),
        ]);
        let h = |s: &str| Some(format!("Bearer {s}").into_bytes());
        let cases = [
            (None, Scope::Read, Err(AuthError::Unauthorized)),
            (Some(b"Basic x".to_vec()), Scope::Read, Err(AuthError::Unauthorized)),
            (h("nope"), Scope::Read, Err(AuthError::Unauthorized)),
            (h("read-tok"), Scope::Read, Ok(Some("r"))),
            (h("read-tok"), Scope::Write, Err(AuthError::Forbidden(Scope::Write))),
            (h("write-tok"), Scope::Read, Ok(Some("w"))),
            (h("write-tok"), Scope::Write, Ok(Some("w"))),
            (h("write-tok"), Scope::Admin, Err(AuthError::Forbidden(Scope::Admin))),
            (h("admin-tok"), Scope::Read, Err(AuthError::Forbidden(Scope::Read))),
            (h("admin-tok"), Scope::Admin, Ok(Some("a"))),
        ];
        for (header, scope, want) in cases {
            assert_eq!(auth.check(header.as_deref(), scope), want, "{header:?} {scope:?}");
        }
        assert_eq!(Auth::new(&[]).check(None, Scope::Admin), Ok(None));
    }
}
