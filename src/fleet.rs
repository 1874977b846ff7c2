//! Talking to peer instances' admin listeners: map pushes, write freezes and releases.
//! Every call has a deadline; a peer that does not answer is reported, never silently skipped.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use crate::config::Config;

/// Header marking a request as coming from a peer (a pushed map is not pushed on again).
pub const FROM_PEER: &str = "x-cellgate-from-peer";

/// One peer's answer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    pub peer: String,
    pub ok: bool,
    pub status: Option<u16>,
    /// The peer's answer (JSON) when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub async fn call(
    base: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Bytes,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let uri: http::Uri = format!("{}{path}", base.trim_end_matches('/')).parse().map_err(|e| format!("{e}"))?;
    let authority = uri.authority().ok_or("peer URL needs host:port")?.clone();
    let fut = async {
        let stream = tokio::net::TcpStream::connect((authority.host(), authority.port_u16().unwrap_or(80)))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        crate::tasks::spawn("fleet_peer_connection", conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority.as_str())
            .header("content-type", content_type)
            .header(FROM_PEER, "1");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Full::new(body)).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Send the same request to every peer concurrently.
pub async fn broadcast(
    cfg: &Config,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Bytes,
    timeout: Duration,
) -> Vec<PeerResult> {
    let calls = cfg.peers.iter().map(|peer| {
        let (method, body) = (method.clone(), body.clone());
        async move {
            match call(peer, method, path, content_type, body, cfg.peer_token.as_deref(), timeout).await {
                Ok((status, bytes)) => PeerResult {
                    peer: peer.clone(),
                    ok: (200..300).contains(&status),
                    status: Some(status),
                    body: serde_json::from_slice(&bytes).ok(),
                    error: None,
                },
                Err(e) => PeerResult { peer: peer.clone(), ok: false, status: None, body: None, error: Some(e) },
            }
        }
    });
    futures_util::future::join_all(calls).await
}
