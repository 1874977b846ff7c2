//! A TDS test server (protocol fixture, NOT SQL Server): answers PRELOGIN (no encryption),
//! LOGIN7 (recording the ReadOnly-intent bit), SQL batches and RPCs (decoding `sp_executesql`
//! and named procedures with their typed parameters) from a scripted handler. It can kill its
//! connections and send a read-only routing redirect at login. Owns only its sockets and tasks;
//! must not touch cellgate internals.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A decoded parameter or cell value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Bit(bool),
    Float(f64),
    /// Unscaled value and scale: `Decimal(1250, 2)` is 12.50.
    Decimal(i128, u8),
    Str(String),
    Bin(Vec<u8>),
    /// Wire-order GUID bytes turned back into the usual text form.
    Guid(String),
    /// Days since 0001-01-01 and 100 ns ticks since midnight.
    DateTime2(u32, u64),
    /// UTC days, UTC ticks, offset in minutes.
    DateTimeOffset(u32, u64, i16),
    Date(u32),
    Time(u64),
    /// Money as its unscaled value (1/10000 units).
    Money(i64),
}

/// One RPC parameter: name, wire type (e.g. `intn(8)`, `nvarchar`, `decimaln(10,2)`), value.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: String,
    pub val: Val,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Batch(String),
    Rpc { proc_name: String, params: Vec<Param> },
}

impl Request {
    /// For `sp_executesql`: (statement, declaration, the `@Pn` parameters).
    pub fn executesql(&self) -> Option<(String, String, Vec<Param>)> {
        let Request::Rpc { proc_name, params } = self else { return None };
        if proc_name != "sp_executesql" {
            return None;
        }
        let text = |p: &Param| match &p.val {
            Val::Str(s) => s.clone(),
            _ => String::new(),
        };
        let stmt = params.iter().find(|p| p.name == "@stmt").map(text)?;
        let decl = params.iter().find(|p| p.name == "@params").map(text).unwrap_or_default();
        let ps = params.iter().filter(|p| p.name.starts_with("@P")).cloned().collect();
        Some((stmt, decl, ps))
    }

    /// The SQL text of a batch or an `sp_executesql` call.
    pub fn sql(&self) -> Option<String> {
        match self {
            Request::Batch(s) => Some(s.clone()),
            r => r.executesql().map(|(s, _, _)| s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColTy {
    Int,
    BigInt,
    Bit,
    Float,
    Decimal(u8, u8),
    Money,
    NVarChar,
    VarBinary,
    Guid,
    DateTime2,
    DateTimeOffset,
    Date,
}

#[derive(Debug, Clone)]
pub enum Reply {
    /// A result set, then DONE with the row count.
    Rows { cols: Vec<(String, ColTy)>, rows: Vec<Vec<Val>> },
    /// DONE with a row count (an INSERT/UPDATE).
    Affected(u64),
    /// An ERROR token (number, severity class, message) then DONE with the error bit.
    Error { code: u32, class: u8, message: String },
    /// Close the connection instead of answering.
    Kill,
    /// Wait before answering (deadline tests).
    Sleep(Duration, Box<Reply>),
}

pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub read_only_intent: bool,
    pub user: String,
    pub database: String,
}

struct Shared {
    handler: Mutex<Handler>,
    requests: Mutex<Vec<Request>>,
    logins: Mutex<Vec<Login>>,
    routing: Mutex<Option<(String, u16)>>,
    conns: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicUsize,
}

pub struct TdsServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for TdsServer {
    fn drop(&mut self) {
        self.task.abort();
        self.kill_all();
    }
}

impl TdsServer {
    pub async fn start(handler: Handler) -> TdsServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tds test server");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            handler: Mutex::new(handler),
            requests: Mutex::new(Vec::new()),
            logins: Mutex::new(Vec::new()),
            routing: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s2 = s.clone();
                let h = tokio::spawn(async move {
                    let _ = serve(sock, s2).await;
                });
                let mut conns = s.conns.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(h);
            }
        });
        TdsServer { addr, shared, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_handler(&self, h: Handler) {
        *self.shared.handler.lock().unwrap() = h;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    pub fn logins(&self) -> Vec<Login> {
        self.shared.logins.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Answer the next logins with a routing redirect to `host:port`.
    pub fn set_routing(&self, to: Option<(String, u16)>) {
        *self.shared.routing.lock().unwrap() = to;
    }

    /// Close every open connection server-side.
    pub fn kill_all(&self) {
        for h in self.shared.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Framing
// ------------------------------------------------------------------------------------------

const PKT_PRELOGIN: u8 = 0x12;
const PKT_LOGIN7: u8 = 0x10;
const PKT_BATCH: u8 = 0x01;
const PKT_RPC: u8 = 0x03;
const PKT_ATTENTION: u8 = 0x06;
const PKT_REPLY: u8 = 0x04;

async fn read_message(sock: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 8];
        sock.read_exact(&mut h).await?;
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(8)];
        sock.read_exact(&mut body).await?;
        out.extend_from_slice(&body);
        if h[1] & 0x01 != 0 {
            return Ok((h[0], out));
        }
    }
}

async fn write_message(sock: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    const MAX: usize = 4096 - 8;
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(MAX).collect() };
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let mut p = Vec::with_capacity(c.len() + 8);
        p.push(PKT_REPLY);
        p.push(if i + 1 == n { 0x01 } else { 0x00 });
        p.extend_from_slice(&((c.len() + 8) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, (i + 1) as u8, 0]);
        p.extend_from_slice(c);
        sock.write_all(&p).await?;
    }
    Ok(())
}

fn utf16(b: &[u8]) -> String {
    let units: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    String::from_utf16_lossy(&units)
}

fn put_utf16(out: &mut Vec<u8>, s: &str) {
    for u in s.encode_utf16() {
        out.extend_from_slice(&u.to_le_bytes());
    }
}

fn b_varchar(out: &mut Vec<u8>, s: &str) {
    out.push(s.encode_utf16().count() as u8);
    put_utf16(out, s);
}

// ------------------------------------------------------------------------------------------
// Session
// ------------------------------------------------------------------------------------------

async fn serve(mut sock: TcpStream, s: Arc<Shared>) -> std::io::Result<()> {
    loop {
        let (ty, msg) = read_message(&mut sock).await?;
        match ty {
            PKT_PRELOGIN => write_message(&mut sock, &prelogin_reply()).await?,
            PKT_LOGIN7 => {
                let login = parse_login(&msg);
                s.logins.lock().unwrap().push(login);
                let routing = s.routing.lock().unwrap().clone();
                let mut out = login_ack();
                if let Some((host, port)) = routing {
                    out.extend(routing_envchange(&host, port));
                }
                out.extend(done(0xFD, 0, 0));
                write_message(&mut sock, &out).await?;
            }
            PKT_BATCH => {
                let req = Request::Batch(utf16(skip_all_headers(&msg)));
                if !answer(&mut sock, &s, req, 0xFD).await? {
                    return Ok(());
                }
            }
            PKT_RPC => {
                let req =
                    parse_rpc(skip_all_headers(&msg)).unwrap_or(Request::Rpc { proc_name: "?".into(), params: vec![] });
                if !answer(&mut sock, &s, req, 0xFF).await? {
                    return Ok(());
                }
            }
            // Attention: acknowledge (DONE with the ATTN bit).
            PKT_ATTENTION => write_message(&mut sock, &done(0xFD, 0x20, 0)).await?,
            _ => return Ok(()),
        }
    }
}

/// Answer one request; `false` when the script says to kill the connection.
async fn answer(sock: &mut TcpStream, s: &Shared, req: Request, done_ty: u8) -> std::io::Result<bool> {
    s.requests.lock().unwrap().push(req.clone());
    let handler = s.handler.lock().unwrap().clone();
    let mut reply = handler(&req);
    while let Reply::Sleep(d, r) = reply {
        tokio::time::sleep(d).await;
        reply = *r;
    }
    let rpc = done_ty == 0xFF;
    let mut out = Vec::new();
    match reply {
        Reply::Kill => {
            let _ = sock.shutdown().await;
            return Ok(false);
        }
        Reply::Rows { cols, rows } => {
            out.extend(colmetadata(&cols));
            for r in &rows {
                out.extend(row(&cols, r));
            }
            out.extend(done(done_ty, 0x10, rows.len() as u64));
        }
        Reply::Affected(n) => out.extend(done(done_ty, 0x10, n)),
        Reply::Error { code, class, message } => {
            out.extend(error_token(code, class, &message));
            out.extend(done(done_ty, 0x02, 0));
        }
        Reply::Sleep(..) => unreachable!("unwrapped above"),
    }
    if rpc {
        out.extend([0x79, 0, 0, 0, 0]); // RETURNSTATUS 0
        out.extend(done(0xFE, 0, 0));
    }
    write_message(sock, &out).await?;
    Ok(true)
}

fn prelogin_reply() -> Vec<u8> {
    // VERSION (6), ENCRYPTION (1: ENCRYPT_NOT_SUP), INSTOPT (1), THREADID (4), MARS (1).
    let fields: [(u8, Vec<u8>); 5] = [
        (0x00, vec![16, 0, 0x07, 0xD0, 0, 0]),
        (0x01, vec![0x02]),
        (0x02, vec![0]),
        (0x03, vec![0, 0, 0, 0]),
        (0x04, vec![0]),
    ];
    let mut head = Vec::new();
    let mut data = Vec::new();
    let mut offset = (fields.len() * 5 + 1) as u16;
    for (t, d) in &fields {
        head.push(*t);
        head.extend_from_slice(&offset.to_be_bytes());
        head.extend_from_slice(&(d.len() as u16).to_be_bytes());
        offset += d.len() as u16;
        data.extend_from_slice(d);
    }
    head.push(0xFF);
    head.extend(data);
    head
}

fn parse_login(m: &[u8]) -> Login {
    let field = |at: usize| -> String {
        if m.len() < at + 4 {
            return String::new();
        }
        let off = u16::from_le_bytes([m[at], m[at + 1]]) as usize;
        let cch = u16::from_le_bytes([m[at + 2], m[at + 3]]) as usize;
        m.get(off..off + cch * 2).map(utf16).unwrap_or_default()
    };
    Login { read_only_intent: m.get(26).is_some_and(|b| b & 0x20 != 0), user: field(40), database: field(68) }
}

fn login_ack() -> Vec<u8> {
    let mut body = vec![1u8];
    body.extend_from_slice(&0x7400_0004u32.to_be_bytes());
    b_varchar(&mut body, "tds-test-server");
    body.extend_from_slice(&[16, 0, 0, 0]);
    let mut out = vec![0xAD];
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend(body);
    out
}

fn routing_envchange(host: &str, port: u16) -> Vec<u8> {
    let mut value = vec![0u8]; // protocol: TCP
    value.extend_from_slice(&port.to_le_bytes());
    value.extend_from_slice(&(host.encode_utf16().count() as u16).to_le_bytes());
    put_utf16(&mut value, host);
    let mut body = vec![20u8];
    body.extend_from_slice(&(value.len() as u16).to_le_bytes());
    body.extend(value);
    body.extend_from_slice(&[0, 0]); // old value: empty
    let mut out = vec![0xE3];
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend(body);
    out
}

fn done(ty: u8, status: u16, rows: u64) -> Vec<u8> {
    let mut out = vec![ty];
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&rows.to_le_bytes());
    out
}

fn error_token(code: u32, class: u8, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&code.to_le_bytes());
    body.push(1); // state
    body.push(class);
    body.extend_from_slice(&(message.encode_utf16().count() as u16).to_le_bytes());
    put_utf16(&mut body, message);
    b_varchar(&mut body, "tds-test-server");
    b_varchar(&mut body, "");
    body.extend_from_slice(&1u32.to_le_bytes());
    let mut out = vec![0xAA];
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend(body);
    out
}

fn skip_all_headers(m: &[u8]) -> &[u8] {
    if m.len() < 4 {
        return &[];
    }
    let total = u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize;
    m.get(total..).unwrap_or(&[])
}

// ------------------------------------------------------------------------------------------
// RPC decoding
// ------------------------------------------------------------------------------------------

struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.i..self.i + n)?;
        self.i += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
    /// PLP body: total length, then chunks until a zero-length one.
    fn plp(&mut self) -> Option<Option<Vec<u8>>> {
        let total = self.u64()?;
        if total == u64::MAX {
            return Some(None);
        }
        let mut out = Vec::new();
        loop {
            let n = self.u32()? as usize;
            if n == 0 {
                return Some(Some(out));
            }
            out.extend_from_slice(self.take(n)?);
        }
    }
}

fn le_uint(b: &[u8]) -> u128 {
    b.iter().rev().fold(0u128, |acc, x| (acc << 8) | *x as u128)
}

fn guid_text(b: &[u8]) -> String {
    // Wire order: first three groups little-endian.
    let o = [b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]];
    let h: Vec<String> = o.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

fn parse_rpc(b: &[u8]) -> Option<Request> {
    let mut c = Cur { b, i: 0 };
    let n = c.u16()?;
    let proc_name = if n == 0xFFFF {
        match c.u16()? {
            10 => "sp_executesql".to_string(),
            id => format!("proc#{id}"),
        }
    } else {
        utf16(c.take(n as usize * 2)?)
    };
    c.u16()?; // option flags
    let mut params = Vec::new();
    while !c.done() {
        let nl = c.u8()? as usize;
        let mut name = utf16(c.take(nl * 2)?);
        if !name.starts_with('@') {
            name = format!("@{name}");
        }
        c.u8()?; // status
        let (ty, val) = parse_value(&mut c)?;
        params.push(Param { name, ty, val });
    }
    Some(Request::Rpc { proc_name, params })
}

fn parse_value(c: &mut Cur<'_>) -> Option<(String, Val)> {
    let t = c.u8()?;
    Some(match t {
        0x1F => ("null".into(), Val::Null),
        0x26 | 0x68 | 0x6D | 0x24 | 0x6E => {
            let max = c.u8()?;
            let len = c.u8()? as usize;
            let name = match t {
                0x26 => format!("intn({max})"),
                0x68 => "bitn".into(),
                0x6D => format!("floatn({max})"),
                0x6E => "moneyn".into(),
                _ => "guid".into(),
            };
            if len == 0 {
                return Some((name, Val::Null));
            }
            let b = c.take(len)?;
            let v = match t {
                0x26 => Val::Int(match len {
                    1 => b[0] as i64,
                    2 => i16::from_le_bytes([b[0], b[1]]) as i64,
                    4 => i32::from_le_bytes(b.try_into().ok()?) as i64,
                    _ => i64::from_le_bytes(b.try_into().ok()?),
                }),
                0x68 => Val::Bit(b[0] != 0),
                0x6D if len == 4 => Val::Float(f32::from_le_bytes(b.try_into().ok()?) as f64),
                0x6D => Val::Float(f64::from_le_bytes(b.try_into().ok()?)),
                0x6E => {
                    let hi = i32::from_le_bytes(b[0..4].try_into().ok()?) as i64;
                    let lo = u32::from_le_bytes(b[4..8].try_into().ok()?) as i64;
                    Val::Money((hi << 32) | lo)
                }
                _ => Val::Guid(guid_text(b)),
            };
            (name, v)
        }
        0x6A | 0x6C => {
            c.u8()?;
            let (p, s) = (c.u8()?, c.u8()?);
            let name = format!("{}({p},{s})", if t == 0x6A { "decimaln" } else { "numericn" });
            let len = c.u8()? as usize;
            if len == 0 {
                return Some((name, Val::Null));
            }
            let b = c.take(len)?;
            let mag = le_uint(&b[1..]) as i128;
            (name, Val::Decimal(if b[0] == 1 { mag } else { -mag }, s))
        }
        0xE7 | 0xA5 | 0xEF | 0xA7 | 0xAD => {
            let max = c.u16()?;
            if t == 0xE7 || t == 0xEF || t == 0xA7 {
                c.take(5)?; // collation
            }
            let name = match t {
                0xE7 => "nvarchar",
                0xEF => "nchar",
                0xA7 => "varchar",
                _ => "varbinary",
            }
            .to_string();
            let bytes = if max == 0xFFFF {
                c.plp()?
            } else {
                let n = c.u16()?;
                if n == 0xFFFF { None } else { Some(c.take(n as usize)?.to_vec()) }
            };
            let v = match bytes {
                None => Val::Null,
                Some(b) if t == 0xA5 || t == 0xAD => Val::Bin(b),
                Some(b) if t == 0xA7 => Val::Str(String::from_utf8_lossy(&b).into_owned()),
                Some(b) => Val::Str(utf16(&b)),
            };
            (name, v)
        }
        0x28 => {
            let len = c.u8()? as usize;
            if len == 0 {
                return Some(("daten".into(), Val::Null));
            }
            ("daten".into(), Val::Date(le_uint(c.take(3)?) as u32))
        }
        0x29..=0x2B => {
            let scale = c.u8()?;
            let len = c.u8()? as usize;
            let name = match t {
                0x29 => format!("timen({scale})"),
                0x2A => format!("datetime2n({scale})"),
                _ => format!("datetimeoffsetn({scale})"),
            };
            if len == 0 {
                return Some((name, Val::Null));
            }
            let b = c.take(len)?;
            let tlen = match t {
                0x29 => len,
                0x2A => len - 3,
                _ => len - 5,
            };
            let ticks = le_uint(&b[..tlen]) as u64 * 10u64.pow(7u32.saturating_sub(scale as u32));
            let v = match t {
                0x29 => Val::Time(ticks),
                0x2A => Val::DateTime2(le_uint(&b[tlen..tlen + 3]) as u32, ticks),
                _ => Val::DateTimeOffset(
                    le_uint(&b[tlen..tlen + 3]) as u32,
                    ticks,
                    i16::from_le_bytes([b[tlen + 3], b[tlen + 4]]),
                ),
            };
            (name, v)
        }
        other => (format!("type 0x{other:02x}"), Val::Null),
    })
}

// ------------------------------------------------------------------------------------------
// Result encoding
// ------------------------------------------------------------------------------------------

const COLLATION: [u8; 5] = [0x09, 0x04, 0xD0, 0x00, 0x34];

fn colmetadata(cols: &[(String, ColTy)]) -> Vec<u8> {
    let mut out = vec![0x81];
    out.extend_from_slice(&(cols.len() as u16).to_le_bytes());
    for (name, ty) in cols {
        out.extend_from_slice(&0u32.to_le_bytes()); // user type
        out.extend_from_slice(&0x0001u16.to_le_bytes()); // nullable
        match ty {
            ColTy::Int => out.extend([0x26, 4]),
            ColTy::BigInt => out.extend([0x26, 8]),
            ColTy::Bit => out.extend([0x68, 1]),
            ColTy::Float => out.extend([0x6D, 8]),
            ColTy::Decimal(p, s) => out.extend([0x6A, 17, *p, *s]),
            ColTy::Money => out.extend([0x6E, 8]),
            ColTy::NVarChar => {
                out.push(0xE7);
                out.extend_from_slice(&8000u16.to_le_bytes());
                out.extend(COLLATION);
            }
            ColTy::VarBinary => {
                out.push(0xA5);
                out.extend_from_slice(&8000u16.to_le_bytes());
            }
            ColTy::Guid => out.extend([0x24, 16]),
            ColTy::DateTime2 => out.extend([0x2A, 7]),
            ColTy::DateTimeOffset => out.extend([0x2B, 7]),
            ColTy::Date => out.push(0x28),
        }
        b_varchar(&mut out, name);
    }
    out
}

fn row(cols: &[(String, ColTy)], vals: &[Val]) -> Vec<u8> {
    let mut out = vec![0xD1];
    for ((_, ty), v) in cols.iter().zip(vals) {
        let sized16 = matches!(ty, ColTy::NVarChar | ColTy::VarBinary);
        if *v == Val::Null {
            if sized16 {
                out.extend_from_slice(&0xFFFFu16.to_le_bytes());
            } else {
                out.push(0);
            }
            continue;
        }
        match (ty, v) {
            (ColTy::Int, Val::Int(i)) => {
                out.push(4);
                out.extend_from_slice(&(*i as i32).to_le_bytes());
            }
            (ColTy::BigInt, Val::Int(i)) => {
                out.push(8);
                out.extend_from_slice(&i.to_le_bytes());
            }
            (ColTy::Bit, Val::Bit(b)) => out.extend([1, *b as u8]),
            (ColTy::Float, Val::Float(f)) => {
                out.push(8);
                out.extend_from_slice(&f.to_le_bytes());
            }
            (ColTy::Decimal(..), Val::Decimal(v, _)) => {
                out.push(17);
                out.push(if *v < 0 { 0 } else { 1 });
                out.extend_from_slice(&v.unsigned_abs().to_le_bytes());
            }
            (ColTy::Money, Val::Money(m)) => {
                out.push(8);
                out.extend_from_slice(&((*m >> 32) as i32).to_le_bytes());
                out.extend_from_slice(&(*m as u32).to_le_bytes());
            }
            (ColTy::NVarChar, Val::Str(s)) => {
                let mut b = Vec::new();
                put_utf16(&mut b, s);
                out.extend_from_slice(&(b.len() as u16).to_le_bytes());
                out.extend(b);
            }
            (ColTy::VarBinary, Val::Bin(b)) => {
                out.extend_from_slice(&(b.len() as u16).to_le_bytes());
                out.extend_from_slice(b);
            }
            (ColTy::Guid, Val::Guid(s)) => {
                let hex: String = s.chars().filter(|c| *c != '-').collect();
                let b: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).unwrap()).collect();
                out.push(16);
                out.extend([b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6]]);
                out.extend_from_slice(&b[8..]);
            }
            (ColTy::DateTime2, Val::DateTime2(days, ticks)) => {
                out.push(8);
                out.extend_from_slice(&ticks.to_le_bytes()[..5]);
                out.extend_from_slice(&days.to_le_bytes()[..3]);
            }
            (ColTy::DateTimeOffset, Val::DateTimeOffset(days, ticks, off)) => {
                out.push(10);
                out.extend_from_slice(&ticks.to_le_bytes()[..5]);
                out.extend_from_slice(&days.to_le_bytes()[..3]);
                out.extend_from_slice(&off.to_le_bytes());
            }
            (ColTy::Date, Val::Date(days)) => {
                out.push(3);
                out.extend_from_slice(&days.to_le_bytes()[..3]);
            }
            (ty, v) => panic!("test script error: value {v:?} for a {ty:?} column"),
        }
    }
    out
}
