//! The two in-process clients: tokio-postgres straight to the replica, and HTTP/1.1 keep-alive
//! (hyper) through cellgate. Both run the same point read with a pseudo-random `aid` per request,
//! one outstanding request per connection, for a fixed time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio_postgres::NoTls;

pub const POINT_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// Latencies (µs), errors and elapsed seconds of one timed run.
pub struct Timed {
    pub lat: Vec<u64>,
    pub errors: u64,
    pub secs: f64,
}

fn next_aid(x: &mut u64, accounts: i64) -> i32 {
    // splitmix64
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % accounts as u64) as i32 + 1
}

async fn collect(stop: Arc<AtomicBool>, dur: Duration, tasks: Vec<tokio::task::JoinHandle<(Vec<u64>, u64)>>) -> Timed {
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok((l, e)) => {
                lat.extend(l);
                errors += e;
            }
            Err(_) => errors += 1,
        }
    }
    Timed { lat, errors, secs: t.elapsed().as_secs_f64() }
}

/// `conc` tokio-postgres connections running the prepared point read on `url`.
pub async fn direct(url: &str, conc: usize, dur: Duration, accounts: i64) -> Result<Timed, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..conc {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.map_err(|e| format!("connect {url}: {e}"))?;
        tokio::spawn(conn);
        let stmt = client.prepare(POINT_SQL).await.map_err(|e| format!("prepare: {e}"))?;
        clients.push((client, stmt));
    }
    let mut tasks = Vec::new();
    for (w, (client, stmt)) in clients.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::with_capacity(1 << 16), 0u64);
            let mut x = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let aid = next_aid(&mut x, accounts);
                let t = Instant::now();
                match client.query(&stmt, &[&aid]).await {
                    Ok(rows) if rows.len() == 1 => lat.push(t.elapsed().as_micros() as u64),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    Ok(collect(stop, dur, tasks).await)
}

/// The JSON body of a point read through cellgate.
pub fn point_body(lat: f64, lng: f64, aid: i64) -> String {
    format!(r#"{{"region":{{"lat":{lat},"lng":{lng}}},"sql":"{POINT_SQL}","params":[{aid}],"row_format":"array"}}"#)
}

/// `conc` HTTP/1.1 keep-alive connections sending the point read through cellgate.
pub async fn proxied(
    addr: &str,
    token: &str,
    conc: usize,
    dur: Duration,
    accounts: i64,
    at: (f64, f64),
) -> Result<Timed, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..conc {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        senders.push(sender);
    }
    let auth = format!("Bearer {token}");
    let mut tasks = Vec::new();
    for (w, mut sender) in senders.into_iter().enumerate() {
        let stop = stop.clone();
        let (addr, auth) = (addr.to_string(), auth.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::with_capacity(1 << 16), 0u64);
            let mut x = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let aid = next_aid(&mut x, accounts);
                let Ok(req) = http::Request::post("/v1/sql/core/query")
                    .header("host", &addr)
                    .header("content-type", "application/json")
                    .header("authorization", &auth)
                    .body(Full::new(Bytes::from(point_body(at.0, at.1, aid as i64))))
                else {
                    errors += 1;
                    continue;
                };
                let t = Instant::now();
                let ok = match sender.send_request(req).await {
                    Ok(resp) => {
                        let good = resp.status().is_success();
                        resp.into_body().collect().await.is_ok() && good
                    }
                    Err(_) => {
                        // The connection is gone: stop this worker.
                        errors += 1;
                        break;
                    }
                };
                if ok {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    Ok(collect(stop, dur, tasks).await)
}
