//! An entry and its bytes in Redis: a small header (format, flags, fill time, TTL, stale window)
//! and the value, lz4-compressed above a size when that makes it smaller. The value itself is the
//! data plane's encoding (this file never looks inside it). Pure; no I/O.

use bytes::Bytes;

/// One cached answer. `body` is the value as the data plane encoded it (uncompressed: L1 keeps
/// entries ready to decode; only the Redis copy is compressed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub body: Bytes,
    /// Unix time of the backend read that produced it, ms.
    pub filled_at_ms: u64,
    /// Fresh for this long after `filled_at_ms`.
    pub ttl_ms: u64,
    /// Then served stale (while one refresh runs) for this long.
    pub swr_ms: u64,
}

impl Entry {
    /// Bytes it costs L1 (the body plus a fixed allowance for the entry, its key and moka's
    /// bookkeeping).
    pub fn weight(&self) -> u64 {
        self.body.len() as u64 + 160
    }

    pub fn fresh_until_ms(&self) -> u64 {
        self.filled_at_ms.saturating_add(self.ttl_ms)
    }

    pub fn stale_until_ms(&self) -> u64 {
        self.fresh_until_ms().saturating_add(self.swr_ms)
    }
}

const MAGIC: u8 = b'C';
const FORMAT: u8 = 1;
const LZ4: u8 = 1;
const HEADER: usize = 3 + 3 * 8;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("not a cellgate cache entry (format {0})")]
    Format(String),
    #[error("entry claims {0} bytes uncompressed, over the entry limit")]
    TooLarge(usize),
    #[error("lz4: {0}")]
    Lz4(String),
}

/// The Redis bytes of `e`: compressed when `body` is longer than `compress_above` and lz4 makes
/// it smaller.
pub fn encode(e: &Entry, compress_above: usize) -> Vec<u8> {
    let compressed = (e.body.len() > compress_above)
        .then(|| lz4_flex::block::compress_prepend_size(&e.body))
        .filter(|c| c.len() < e.body.len());
    let payload: &[u8] = compressed.as_deref().unwrap_or(&e.body);
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&[MAGIC, FORMAT, if compressed.is_some() { LZ4 } else { 0 }]);
    for v in [e.filled_at_ms, e.ttl_ms, e.swr_ms] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// Read back what [`encode`] wrote; a body that would be larger than `max_body` uncompressed is
/// refused before anything is allocated for it.
pub fn decode(b: &[u8], max_body: usize) -> Result<Entry, CodecError> {
    if b.len() < HEADER || b[0] != MAGIC || b[1] != FORMAT || b[2] & !LZ4 != 0 {
        return Err(CodecError::Format(format!("{:?}", b.get(..3))));
    }
    let word = |i: usize| u64::from_le_bytes(b[3 + 8 * i..11 + 8 * i].try_into().expect("8 bytes"));
    let payload = &b[HEADER..];
    let body = if b[2] & LZ4 != 0 {
        let size = payload.get(..4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize);
        let size = size.ok_or_else(|| CodecError::Lz4("no size".into()))?;
        if size > max_body {
            return Err(CodecError::TooLarge(size));
        }
        lz4_flex::block::decompress(&payload[4..], size).map_err(|e| CodecError::Lz4(e.to_string()))?
    } else {
        if payload.len() > max_body {
            return Err(CodecError::TooLarge(payload.len()));
        }
        payload.to_vec()
    };
    Ok(Entry { body: Bytes::from(body), filled_at_ms: word(0), ttl_ms: word(1), swr_ms: word(2) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: Vec<u8>) -> Entry {
        Entry { body: Bytes::from(body), filled_at_ms: 1_790_000_000_123, ttl_ms: 30_000, swr_ms: 5_000 }
    }

    #[test]
    fn compression_round_trips() {
        let text: Vec<u8> = br#"{"id":1,"name":"Ana Lopez","city":"Madrid"},"#.repeat(200);
        let e = entry(text.clone());
        let small = encode(&e, 1 << 20);
        assert_eq!(small[2], 0, "under the threshold: stored as is");
        assert_eq!(small.len(), HEADER + text.len());
        let packed = encode(&e, 64);
        assert_eq!(packed[2], LZ4);
        assert!(packed.len() < text.len() / 4, "{} of {}", packed.len(), text.len());
        for b in [&small, &packed] {
            assert_eq!(decode(b, 1 << 20).unwrap(), e);
        }
        // Bytes that do not shrink are stored as they are, whatever the threshold.
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let n = encode(&entry(noise.clone()), 16);
        assert_eq!(decode(&n, 1 << 20).unwrap().body, Bytes::from(noise));
    }

    #[test]
    fn refuses_garbage_and_oversized_claims() {
        assert!(decode(b"", 10).is_err());
        assert!(decode(b"XYZ0000000000000000000000000000", 10).is_err());
        let e = entry(vec![b'a'; 10_000]);
        let packed = encode(&e, 0);
        assert_eq!(decode(&packed, 9_999), Err(CodecError::TooLarge(10_000)));
        let mut cut = packed.clone();
        cut.truncate(packed.len() - 3);
        assert!(decode(&cut, 1 << 20).is_err());
        assert_eq!(e.stale_until_ms(), e.filled_at_ms + 35_000);
    }
}
