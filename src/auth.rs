//! Who a request is and what it may do: bearer tokens configured by SHA-256 digest, and
//! client-certificate identities (`[[clients]]`) given as strings by the listener; scopes
//! read/write/ddl/admin. Pure: knows no TLS types. Never stores or logs a clear token.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::{Client, Scope, Token};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No or unknown token (and no client certificate): 401.
    Unauthorized,
    /// Known token or client without the scope: 403.
    Forbidden(Scope),
    /// A client certificate (no `Authorization` header) whose identities (these; empty when the
    /// certificate carries none cellgate reads) match no `[[clients]]` entry: 403.
    UnknownClient(Vec<String>),
}

pub struct Auth {
    /// The bearer token this instance presents to its peers (`peer_token`), clear text.
    peer_token: Option<String>,
    /// digest → (token name, scopes).
    tokens: HashMap<[u8; 32], (String, Vec<Scope>)>,
    /// (canonical identity, client name, scopes) in config order: the first entry matching one
    /// of a certificate's identities names the request.
    clients: Vec<(String, String, Vec<Scope>)>,
}

impl Auth {
    /// From validated config (entries that fail validation are skipped, never half-used).
    pub fn new(tokens: &[Token], clients: &[Client]) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|t| {
                let d: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                Some((d, (t.name.clone(), t.scopes.clone())))
            })
            .collect();
        let clients = clients
            .iter()
            .filter_map(|c| {
                let id = crate::config::client_identity(&c.identity).ok()?;
                let scopes = c.scopes.iter().map(|s| Scope::parse(s)).collect::<Option<Vec<_>>>()?;
                Some((id, c.name.clone(), scopes))
            })
            .collect();
        Self { tokens, clients, peer_token: None }
    }

    /// Every credential of a config: tokens, clients and the peer token.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self { peer_token: cfg.peer_token.clone(), ..Self::new(&cfg.tokens, &cfg.clients) }
    }

    /// The token to present to peers' admin listeners. Callers must not log it.
    pub fn peer_token(&self) -> Option<&str> {
        self.peer_token.as_deref()
    }

    /// Tokens or clients configured. Off, every request is let through (loopback or
    /// `--insecure-no-auth` only).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || !self.clients.is_empty()
    }

    /// Check a request for `scope`: its `Authorization` header value and, when it came over a
    /// connection with a client certificate, that certificate's identities. `write` implies `read`
    /// for data requests (a writer may read back); `admin` is separate and only valid on the
    /// admin listener.
    pub fn check(
        &self,
        header: Option<&[u8]>,
        peer: Option<&[String]>,
        scope: Scope,
    ) -> Result<Option<&str>, AuthError> {
        match self.identify(header, peer)? {
            None => Ok(None),
            Some(id) if id.allows(scope) => Ok(Some(id.name)),
            Some(_) => Err(AuthError::Forbidden(scope)),
        }
    }

    /// Who a request is (`None` when auth is off), so one request can ask about several scopes
    /// with one lookup. An `Authorization` header, when present, decides alone (a bad token is
    /// 401 even with a good certificate: the client said which credential it means); without
    /// one, the client certificate's identities (`peer`) do.
    pub fn identify(&self, header: Option<&[u8]>, peer: Option<&[String]>) -> Result<Option<Identity<'_>>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        match (header, peer) {
            // With no `[[clients]]` a certificate only gates the handshake: a request without a
            // token is 401 (its token is missing), not an unknown client.
            (None, Some(ids)) if !self.clients.is_empty() => self.client(ids).map(Some),
            _ => self.bearer(header).map(Some),
        }
    }

    fn bearer(&self, header: Option<&[u8]>) -> Result<Identity<'_>, AuthError> {
        let token = header
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(AuthError::Unauthorized)?;
        // Lookup by digest: comparing digests, not tokens, leaks nothing useful through timing.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (name, scopes) = self.tokens.get(&digest).ok_or(AuthError::Unauthorized)?;
        Ok(Identity { name, scopes })
    }

    /// The first `[[clients]]` entry, in config order, whose identity the certificate carries.
    fn client(&self, ids: &[String]) -> Result<Identity<'_>, AuthError> {
        self.clients
            .iter()
            .find(|(id, _, _)| ids.contains(id))
            .map(|(_, name, scopes)| Identity { name, scopes })
            .ok_or_else(|| AuthError::UnknownClient(ids.to_vec()))
    }
}

/// A known token or client: its name and scopes.
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

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scopes_table() {
        let t =
            |name: &str, tok: &str, scopes: Vec<Scope>| Token { name: name.into(), sha256: digest_hex(tok), scopes };
        let c = |identity: &str, name: &str, scopes: &[&str]| Client {
            identity: identity.into(),
            name: name.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        };
        let auth = Auth::new(
            &[
                t("r", "read-tok", vec![Scope::Read]),
                t("w", "write-tok", vec![Scope::Write]),
                t("a", "admin-tok", vec![Scope::Admin]),
            ],
            &[
                c("spiffe://cluster.local/ns/x/sa/orders", "orders", &["read", "write"]),
                c("dns:Reports.Internal", "reports", &["read"]),
                c("cn:ops", "ops", &["admin"]),
                // Same certificate as `orders` (it carries both): the earlier entry wins.
                c("dns:orders.internal", "orders-by-dns", &["admin"]),
            ],
        );
        let h = |s: &str| Some(format!("Bearer {s}").into_bytes());
        let none: Option<Vec<String>> = None;
        let orders = Some(ids(&["spiffe://cluster.local/ns/x/sa/orders", "dns:orders.internal", "cn:orders"]));
        let reports = Some(ids(&["dns:reports.internal"]));
        let ops = Some(ids(&["cn:ops"]));
        let stranger = Some(ids(&["spiffe://cluster.local/ns/y/sa/other", "cn:other"]));
        let unknown = |l: &[&str]| Err(AuthError::UnknownClient(ids(l)));
        let cases = [
            // Bearer tokens, no certificate.
            (None, none.clone(), Scope::Read, Err(AuthError::Unauthorized)),
            (Some(b"Basic x".to_vec()), none.clone(), Scope::Read, Err(AuthError::Unauthorized)),
            (h("nope"), none.clone(), Scope::Read, Err(AuthError::Unauthorized)),
            (h("read-tok"), none.clone(), Scope::Read, Ok(Some("r"))),
            (h("read-tok"), none.clone(), Scope::Write, Err(AuthError::Forbidden(Scope::Write))),
            (h("write-tok"), none.clone(), Scope::Read, Ok(Some("w"))),
            (h("write-tok"), none.clone(), Scope::Write, Ok(Some("w"))),
            (h("write-tok"), none.clone(), Scope::Admin, Err(AuthError::Forbidden(Scope::Admin))),
            (h("admin-tok"), none.clone(), Scope::Read, Err(AuthError::Forbidden(Scope::Read))),
            (h("admin-tok"), none.clone(), Scope::Admin, Ok(Some("a"))),
            // Client certificates, no header: first matching entry in config order.
            (None, orders.clone(), Scope::Write, Ok(Some("orders"))),
            (None, orders.clone(), Scope::Admin, Err(AuthError::Forbidden(Scope::Admin))),
            (None, reports.clone(), Scope::Read, Ok(Some("reports"))),
            (None, reports.clone(), Scope::Write, Err(AuthError::Forbidden(Scope::Write))),
            (None, ops.clone(), Scope::Admin, Ok(Some("ops"))),
            (None, ops.clone(), Scope::Read, Err(AuthError::Forbidden(Scope::Read))),
            (None, stranger.clone(), Scope::Read, unknown(&["spiffe://cluster.local/ns/y/sa/other", "cn:other"])),
            (None, Some(Vec::new()), Scope::Read, unknown(&[])),
            // A header decides alone, good certificate or not.
            (h("read-tok"), orders.clone(), Scope::Write, Err(AuthError::Forbidden(Scope::Write))),
            (h("nope"), orders.clone(), Scope::Read, Err(AuthError::Unauthorized)),
            (h("write-tok"), stranger.clone(), Scope::Write, Ok(Some("w"))),
        ];
        for (header, peer, scope, want) in cases {
            assert_eq!(auth.check(header.as_deref(), peer.as_deref(), scope), want, "{header:?} {peer:?} {scope:?}");
        }
        assert_eq!(Auth::new(&[], &[]).check(None, None, Scope::Admin), Ok(None));
        assert_eq!(Auth::new(&[], &[]).check(None, stranger.as_deref(), Scope::Admin), Ok(None));
        // Clients alone turn auth on: no certificate and no token is 401.
        let clients_only = Auth::new(&[], &[c("cn:ops", "ops", &["admin"])]);
        assert!(clients_only.enabled());
        assert_eq!(clients_only.check(None, None, Scope::Admin), Err(AuthError::Unauthorized));
        // Tokens alone: a certificate without a token is a missing token.
        let tokens_only = Auth::new(&[t("r", "read-tok", vec![Scope::Read])], &[]);
        assert_eq!(tokens_only.check(None, ops.as_deref(), Scope::Read), Err(AuthError::Unauthorized));
        assert_eq!(tokens_only.check(h("read-tok").as_deref(), ops.as_deref(), Scope::Read), Ok(Some("r")));
    }
}
