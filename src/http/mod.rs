//! Listeners and connection handling for both planes: accept, read the request head under a
//! deadline and size limit (408 / 431), HTTP/1.1 + h2c via hyper-util, body limits (413), in-flight
//! limit (429), request deadline (504), auth, the request span and metrics. With
//! `[listen.*_tls]` a listener speaks HTTPS (handshake bounded by the header timeout, ALPN `h2`
//! and `http/1.1`; certificates from `crate::listen_tls`), then serves exactly as in cleartext;
//! a client certificate's identities are read once per connection and ride on each request.

pub mod admin;
pub mod api;
pub mod docs;
pub mod json;
pub mod parse;
pub mod respond;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::app::AppState;
use crate::config::Scope;
use crate::dataplane::Outcome;
use respond::{ApiError, Body};

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    Data,
    Admin,
}

impl Plane {
    /// The task name of one accepted connection on this plane.
    fn connection_task(self) -> &'static str {
        match self {
            Plane::Data => "connection_data",
            Plane::Admin => "connection_admin",
        }
    }
}

/// A stream that first replays the bytes we already read (the request head), then the socket.
/// On the way out it gives hyper's own error answers a JSON body (`json_error_for_hyper_answer`).
struct Rewind<S> {
    prefix: Bytes,
    inner: S,
    /// A rewritten answer not yet fully written to the socket.
    pending: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Rewind<S> {
    fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner, pending: Bytes::new() }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.pending.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let _ = self.pending.split_to(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Take `buf` as written; if it is one of hyper's bodiless error answers, write the JSON
    /// version instead.
    fn poll_write_checked(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<std::io::Result<usize>>> {
        let answer = json_error_for_hyper_answer(buf)?;
        self.pending = answer;
        // Pending here is fine: the waker is registered and flush/shutdown drain the rest.
        Some(match self.poll_drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        })
    }
}

/// hyper answers a head it cannot parse by itself (400, 414, 431 for more than 100 headers or a
/// head past `max_buf_size` on a kept-alive connection) with an empty body, outside our service.
/// Such an answer is a lone head with `content-length: 0` and no `content-type` (every answer our
/// service builds has one); it is rewritten to carry the API's JSON error body.
fn json_error_for_hyper_answer(buf: &[u8]) -> Option<Bytes> {
    let err = match buf.get(..13)? {
        b"HTTP/1.1 400 " => ApiError::MalformedRequest,
        b"HTTP/1.1 414 " => ApiError::UriTooLong,
        b"HTTP/1.1 431 " => ApiError::HeadersTooLarge,
        _ => return None,
    };
    let head = std::str::from_utf8(buf).ok()?;
    if !head.ends_with("\r\n\r\n") || head[..head.len() - 2].contains("\r\n\r\n") {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    let at = lower.find("\r\ncontent-length: 0\r\n")?;
    if lower.contains("\r\ncontent-type:") {
        return None;
    }
    let body = err.json_body();
    let mut out = String::with_capacity(head.len() + body.len() + 64);
    out.push_str(&head[..at]);
    out.push_str(&format!("\r\ncontent-type: application/json\r\ncontent-length: {}", body.len()));
    out.push_str(&head[at + "\r\ncontent-length: 0".len()..]);
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    Some(Bytes::from(bytes))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_drain(cx))?;
        if let Some(p) = self.poll_write_checked(cx, buf) {
            return p;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_drain(cx))?;
        // hyper's automatic answers are a single head slice.
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next())
            && let Some(p) = self.poll_write_checked(cx, only)
        {
            return p;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

enum Head {
    Ready(Bytes),
    Closed,
    TimedOut,
    TooLarge,
}

/// Read until the first request head is complete (or an h2c preface arrived), within the header
/// timeout and size limit. hyper's own header timeout closes silently; we answer 408 instead.
async fn read_first_head<S: AsyncRead + Unpin>(stream: &mut S, limit: usize, timeout: Duration) -> Head {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
                return Head::Ready(buf.split().freeze());
            }
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                // A head that arrived whole in one read is held to the same limit: hyper's own
                // buffer limit is looser (at least 8 KiB) and its 431 would have no JSON body.
                if end + 4 > limit {
                    return Head::TooLarge;
                }
                return Head::Ready(buf.split().freeze());
            }
            if buf.len() > limit {
                return Head::TooLarge;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Head::Closed,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Head::TimedOut)
}

async fn write_raw_error<S: AsyncWrite + Unpin>(stream: &mut S, e: ApiError) {
    let status = e.status();
    let resp = e.into_response();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

/// Accept connections until `shutdown` flips, then let in-flight requests finish (graceful).
pub async fn serve(
    listener: TcpListener,
    plane: Plane,
    tls: Option<Arc<crate::listen_tls::ListenerTls>>,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let limits = state.config.limits.clone();
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this timer while waiting for the next request on a kept-alive connection,
        // so it is the idle keep-alive limit; the first request head has its own, shorter
        // deadline (408, read_first_head).
        .header_read_timeout(Duration::from_millis(limits.keepalive_timeout_ms.max(limits.header_timeout_ms)))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1000)
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_header_list_size(limits.max_header_bytes as u32);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        crate::tasks::spawn(plane.connection_task(), async move {
            let timeout = Duration::from_millis(state.config.limits.header_timeout_ms);
            let Some(tls) = tls else {
                return connection(stream, plane, state, builder, watcher, timeout, None).await;
            };
            // The handshake and the first request head share the header timeout.
            let started = tokio::time::Instant::now();
            match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
                Ok(Ok(stream)) => {
                    let left = timeout.saturating_sub(started.elapsed());
                    // Parsed once here, shared by every request of the connection.
                    let peer = crate::listen_tls::peer_identity(stream.get_ref().1);
                    connection(stream, plane, state, builder, watcher, left, peer).await
                }
                // Cleartext HTTP on this port, a client that does not trust us, a scanner:
                // the connection is closed (rustls has sent its alert where one applies).
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Serve one connection (TCP or TLS): the first head under `head_timeout` (408 / 431), then hyper.
/// `peer` (a TLS client certificate's identities) goes into every request's extensions.
async fn connection<S>(
    mut stream: S,
    plane: Plane,
    state: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    head_timeout: Duration,
    peer: Option<Arc<crate::listen_tls::PeerIdentity>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let prefix = match read_first_head(&mut stream, state.config.limits.max_header_bytes, head_timeout).await {
        Head::Ready(p) => p,
        Head::Closed => return,
        Head::TimedOut => return write_raw_error(&mut stream, ApiError::RequestTimeout).await,
        Head::TooLarge => return write_raw_error(&mut stream, ApiError::HeadersTooLarge).await,
    };
    let io = TokioIo::new(Rewind::new(prefix, stream));
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let state = state.clone();
        if let Some(p) = &peer {
            req.extensions_mut().insert(p.clone());
        }
        async move { Ok::<_, std::convert::Infallible>(handle(state, plane, req).await) }
    });
    let conn = builder.serve_connection(io, svc).into_owned();
    let _ = watcher.watch(conn).await;
}

/// Read the whole body, refusing more than `limit` bytes without buffering past it.
async fn read_body(mut body: Incoming, headers: &http::HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        // A client waiting for `100 Continue` has sent nothing: answer at once (polling the
        // body would ask it to send).
        let expects = headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects {
            drain(body).await;
        }
        return Err(ApiError::BodyTooLarge(limit));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::InvalidJson(format!("could not read body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                drain(body).await;
                return Err(ApiError::BodyTooLarge(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// After a body passed its limit: read and drop what the client is still sending, up to
/// [`DRAIN_BYTES`] or [`DRAIN_TIME`], before the 413 goes out. Closing a socket with unread input
/// makes the kernel send a reset, which can destroy the answer before the client reads it (the
/// client sees a broken pipe instead of 413). Nothing is kept; a larger or slower body still gets
/// its 413 once the bound is reached, and the connection is closed.
async fn drain(mut body: Incoming) {
    let mut dropped = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            dropped += frame.data_ref().map_or(0, Bytes::len);
            if dropped > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Data-plane bodies are JSON and must say so (`application/json`, parameters such as
/// `; charset=utf-8` allowed, any case): a form or text body is refused before it is read, so a
/// browser's simple cross-origin POST cannot reach a handler.
fn check_json_content_type(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else { return Err(ApiError::UnsupportedMediaType(None)) };
    let declared = String::from_utf8_lossy(v.as_bytes());
    let essence = declared.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(Some(declared.chars().take(100).collect())))
    }
}

/// A request's credentials: its `Authorization` header and, over TLS with a client certificate,
/// that certificate's identities (put there by [`connection`]).
fn credentials(req: &Request<Incoming>) -> (Option<&[u8]>, Option<&[String]>) {
    let header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    let peer = req.extensions().get::<Arc<crate::listen_tls::PeerIdentity>>().map(|p| p.0.as_slice());
    (header, peer)
}

struct InFlight<'a>(&'a AppState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(state: Arc<AppState>, plane: Plane, req: Request<Incoming>) -> Response<Body> {
    match plane {
        Plane::Admin => admin::handle(&state, req).await,
        Plane::Data => data(&state, req).await,
    }
}

/// What a data-plane request asks for (from its path).
enum DataOp {
    Query,
    Execute,
    /// Collection and operation of the document API.
    Docs(String, docs::Op),
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Answer {
    Sql(api::Answer),
    Docs(docs::Answer),
}

async fn data(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    // /v1/sql/{db}/{query|execute} and /v1/docs/{db}/{collection}/{op}
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (db, op) = match parts.as_slice() {
        ["v1", "sql", db, op @ ("query" | "execute")] => {
            (db.to_string(), if *op == "query" { DataOp::Query } else { DataOp::Execute })
        }
        ["v1", "docs", db, coll, op] => match docs::Op::parse(op) {
            Some(op) => (db.to_string(), DataOp::Docs(coll.to_string(), op)),
            None => return ApiError::NotFound.into_response(),
        },
        _ => return ApiError::NotFound.into_response(),
    };
    if req.method() != Method::POST {
        return ApiError::MethodNotAllowed.into_response();
    }
    let (route, read) = match &op {
        DataOp::Query => ("sql_query", true),
        DataOp::Execute => ("sql_execute", false),
        DataOp::Docs(_, o) => (o.route(), o.is_read()),
    };
    let span = tracing::info_span!("request", route, db = %db, cell = tracing::field::Empty, shard = tracing::field::Empty,
        role = tracing::field::Empty, map_version = tracing::field::Empty, status = tracing::field::Empty);
    let scope = if read { Scope::Read } else { Scope::Write };
    let result = async {
        // One lookup per request, asked about every scope the request needs.
        let (authorization, peer) = credentials(&req);
        let auth = state.credentials.auth();
        let id = match auth.identify(authorization, peer) {
            Ok(id) => id,
            Err(crate::auth::AuthError::UnknownClient(ids)) => {
                return (Err(ApiError::UnknownClient(ids)), Outcome::default());
            }
            Err(_) => return (Err(ApiError::Unauthorized), Outcome::default()),
        };
        if id.as_ref().is_some_and(|id| !id.allows(scope)) {
            return (Err(ApiError::Forbidden(if read { "read" } else { "write" })), Outcome::default());
        }
        // DDL needs its own scope on top of write.
        let allow_ddl = matches!(op, DataOp::Execute) && id.as_ref().is_none_or(|id| id.allows(Scope::Ddl));
        if let Err(e) = check_json_content_type(req.headers()) {
            return (Err(e), Outcome::default());
        }
        // In-flight limit: counted before the body is read, so a flood of slow uploads counts too.
        let n = state.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let _guard = InFlight(state);
        if n > state.config.limits.max_in_flight {
            return (Err(ApiError::Overloaded(format!("{n} requests in flight"))), Outcome::default());
        }
        let (parts, body) = req.into_parts();
        let mut out = Outcome::default();
        let work = async {
            let body = read_body(body, &parts.headers, state.config.limits.max_body_bytes).await?;
            // Each handler's future is boxed: an async fn's state is as large as its largest
            // branch, and a parked request (100k of them at the load target) would otherwise
            // carry the biggest handler's state (the MongoDB driver's) whatever it runs.
            match &op {
                DataOp::Query => Box::pin(api::query(state, &db, &body, &parts.headers, &mut out))
                    .await
                    .map(|a| (StatusCode::OK, Answer::Sql(a))),
                DataOp::Execute => Box::pin(api::execute(state, &db, &body, allow_ddl, &mut out))
                    .await
                    .map(|a| (StatusCode::OK, Answer::Sql(a))),
                DataOp::Docs(coll, o) => Box::pin(docs::handle(state, &db, coll, *o, &body, &parts.headers, &mut out))
                    .await
                    .map(|(s, a)| (s, Answer::Docs(a))),
            }
        };
        let r = match tokio::time::timeout(state.config.request_timeout(), work).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout),
        };
        (r, out)
    }
    .instrument(span.clone())
    .await;
    let (result, out) = result;
    let mut resp = match result {
        Ok((status, v)) => respond::json_response(status, &v),
        Err(e) => {
            if e.status().is_server_error() {
                // Enough to act on without the request: where it went, and why it failed.
                tracing::warn!(parent: &span, code = e.code(), db = %db, shard = out.shard.as_deref().unwrap_or("none"),
                    cell = out.cell.as_deref().unwrap_or("none"), error = %e.message(), "request failed");
            }
            e.into_response()
        }
    };
    if let Some(c) = &out.cache {
        respond::cache_headers(&mut resp, c);
    }
    let status = resp.status().as_u16();
    let shard = out.shard.unwrap_or_else(|| "none".into());
    let role = out.role.map(|r| r.as_str()).unwrap_or("none");
    span.record("status", status);
    span.record("shard", shard.as_str());
    span.record("role", role);
    if let Some(c) = &out.cell {
        span.record("cell", c.as_str());
    }
    if let Some(v) = out.map_version {
        span.record("map_version", v);
    }
    tracing::debug!(parent: &span, elapsed_us = started.elapsed().as_micros() as u64, "done");
    // Labels from bounded sets only: route, shard id, role, status. Never cells.
    let labels =
        [("route", route.to_string()), ("shard", shard), ("role", role.to_string()), ("status", status.to_string())];
    metrics::counter!(crate::telemetry::names::REQUESTS, &labels).increment(1);
    metrics::histogram!(crate::telemetry::names::REQUEST_DURATION, &labels[..3])
        .record(started.elapsed().as_secs_f64());
    resp
}

/// Bind a listener; port 0 picks a free port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(ct: Option<&'static str>) -> Result<(), &'static str> {
        let mut h = http::HeaderMap::new();
        if let Some(v) = ct {
            h.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(v));
        }
        check_json_content_type(&h).map_err(|e| e.code())
    }

    #[test]
    fn hyper_error_answers_get_the_json_body() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 21:00:00 GMT\r\n\r\n";
        let out = json_error_for_hyper_answer(hyper_431).expect("rewritten");
        let text = std::str::from_utf8(&out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-type: application/json\r\n"), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())), "{head}");
        assert!(head.ends_with("date: Tue, 01 Dec 2026 21:00:00 GMT"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        let out = json_error_for_hyper_answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(std::str::from_utf8(&out).unwrap().ends_with(
            "\"malformed_request\",\"message\":\"the request head is not valid HTTP/1.1\",\"retryable\":false}}"
        ));
        // Our own answers (they carry a content type), other statuses, heads with a body, and
        // bytes that are not a lone head pass untouched.
        for untouched in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"\x00\x00\x12\x04\x00",
        ] {
            assert!(json_error_for_hyper_answer(untouched).is_none(), "{:?}", String::from_utf8_lossy(untouched));
        }
    }

    #[test]
    fn json_content_type_is_required() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            " application/json ",
        ] {
            assert_eq!(with(Some(ok)), Ok(()), "{ok}");
        }
        for bad in
            [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/jsonx"), Some("")]
        {
            assert_eq!(with(bad), Err("unsupported_media_type"), "{bad:?}");
        }
    }
}
