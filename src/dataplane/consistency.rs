//! How a read picks its endpoint, and the read-your-writes token a write hands back. Pure: the
//! token format and its parsing; no I/O, no HTTP.

use std::time::Duration;

use base64::Engine;

/// How a read picks its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consistency {
    Replica,
    Primary,
    /// Read after a write: the write's shard and position (PostgreSQL WAL LSN, MongoDB operation
    /// time packed in a u64), and how long a replica may be waited for.
    After {
        shard: String,
        lsn: u64,
        wait: Duration,
    },
}

/// Token: base64url("v1:<shard>:<lsn hex>"). Opaque to clients.
pub fn make_token(shard: &str, lsn: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{shard}:{lsn:x}"))
}

/// The shard and position of a token cellgate issued; `None` for anything else.
pub fn parse_token(t: &str) -> Option<(String, u64)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let mut parts = s.splitn(3, ':');
    if parts.next()? != "v1" {
        return None;
    }
    let shard = parts.next()?.to_string();
    let lsn = u64::from_str_radix(parts.next()?, 16).ok()?;
    Some((shard, lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = make_token("eu-1", 0x16_b374_d848);
        assert_eq!(parse_token(&t), Some(("eu-1".into(), 0x16_b374_d848)));
        assert_eq!(parse_token("garbage!"), None);
        assert_eq!(parse_token(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("v2:a:1")), None);
    }
}
