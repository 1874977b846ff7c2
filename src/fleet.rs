//! Talking to peer instances' admin listeners: map pushes, write freezes and releases, over
//! `http://` or verified `https://` (`[tls] peer_ca`, optional client certificate `peer_cert` /
//! `peer_key`, files read at each call so rotated ones are used). Every call has a deadline; a
//! peer that does not answer is reported, never silently skipped.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

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

/// The TLS client configuration for `https://` peers, built from the files now (so a rotated CA
/// or client certificate is used by the next call). Errors name files, never their content.
fn client_config(tls: &crate::config::Tls) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &tls.peer_ca {
        Some(ca) => {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("tls.peer_ca {}: {e}", ca.display()))?;
            if roots.add_parsable_certificates(certs).0 == 0 {
                return Err(format!("tls.peer_ca {}: no usable CA certificate", ca.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match (&tls.peer_cert, &tls.peer_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("tls.peer_cert {}: {e}", cert.display()))?;
            // Owner-only, as every private key cellgate reads.
            let text = crate::secrets::read_secret_file(&key.display().to_string()).map_err(|e| e.to_string())?;
            let k = PrivateKeyDer::from_pem_slice(text.as_bytes())
                .map_err(|_| format!("tls.peer_key {}: no PEM private key", key.display()))?;
            builder.with_client_auth_cert(chain, k).map_err(|e| format!("tls.peer_cert/peer_key: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

pub async fn call(
    base: &str,
    tls: &crate::config::Tls,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Bytes,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let uri: http::Uri = format!("{}{path}", base.trim_end_matches('/')).parse().map_err(|e| format!("{e}"))?;
    let authority = uri.authority().ok_or("peer URL needs host:port")?.clone();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") | None => false,
        Some(other) => return Err(format!("peer URL scheme {other} (expected http or https)")),
    };
    let fut = async {
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let stream =
            tokio::net::TcpStream::connect((authority.host(), port)).await.map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut sender = if https {
            let config = client_config(tls)?;
            let name = rustls::pki_types::ServerName::try_from(authority.host().trim_matches(['[', ']']).to_string())
                .map_err(|e| format!("peer host name: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            crate::tasks::spawn("fleet_peer_connection", conn);
            sender
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            crate::tasks::spawn("fleet_peer_connection", conn);
            sender
        };
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
    peers: &[String],
    tls: &crate::config::Tls,
    peer_token: Option<&str>,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Bytes,
    timeout: Duration,
) -> Vec<PeerResult> {
    let calls = peers.iter().map(|peer| {
        let (method, body) = (method.clone(), body.clone());
        async move {
            match call(peer, tls, method, path, content_type, body, peer_token, timeout).await {
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
