//! Processes: what /proc says about one (CPU, RSS, fds, limits), a background sampler of
//! cellgate's RSS and fds and of the CPU other programs use meanwhile (noise), the open-file
//! limit, and a guard that stops a child by its PID.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Clock ticks per second (USER_HZ).
pub fn hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as f64 } else { 100.0 }
}

/// (ppid, comm, utime+stime ticks) of a process from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(u32, String, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // After ")": state(0) ppid(1) ... utime(11) stime(12).
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((ppid, comm, ticks))
}

/// CPU time (user + system) of a process in microseconds.
pub fn cpu_us(pid: u32) -> Option<f64> {
    stat(pid).map(|(_, _, t)| t as f64 / hz() * 1e6)
}

/// CPU time (user + system, µs) of a process and every descendant alive now: a postmaster and
/// its backends. Backends that exited meanwhile are not counted (pool connections stay open for
/// a whole run).
pub fn tree_cpu_us(root: u32) -> Option<f64> {
    let all = all_procs();
    all.get(&root)?;
    let ticks: u64 = ours(&all, &[root]).iter().filter_map(|p| all.get(p)).map(|(_, _, t)| *t).sum();
    Some(ticks as f64 / hz() * 1e6)
}

/// PIDs of a process's direct children (`/proc/<pid>/task/<pid>/children`; a postmaster is
/// single-threaded, so that lists every backend).
fn direct_children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// CPU (µs) of a process and its direct children (a postmaster and its backends) over a span,
/// children that end during it included up to their last sample: [`tree_cpu_us`] before and after
/// would miss a pgbench run's backends, which exit with it.
pub struct ChildrenCpu {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Option<f64>>>,
}

impl ChildrenCpu {
    pub fn start(root: u32, interval: Duration) -> ChildrenCpu {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let snap = || {
                let mut m: HashMap<u32, u64> = HashMap::new();
                for pid in std::iter::once(root).chain(direct_children(root)) {
                    if let Some((_, _, t)) = stat(pid) {
                        m.insert(pid, t);
                    }
                }
                m
            };
            let base = snap();
            base.get(&root)?;
            let mut last = base.clone();
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                if !stopping {
                    let until = Instant::now() + interval;
                    while Instant::now() < until && !flag.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                last.extend(snap());
                if stopping || flag.load(Ordering::Relaxed) {
                    break;
                }
            }
            let ticks: u64 = last.iter().map(|(p, t)| t.saturating_sub(base.get(p).copied().unwrap_or(0))).sum();
            Some(ticks as f64 / hz() * 1e6)
        });
        ChildrenCpu { stop, handle: Some(handle) }
    }

    pub fn finish(mut self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).flatten()
    }
}

impl Drop for ChildrenCpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// CPU time (user + system, µs) of every child of this process that has ended and been waited
/// for, and of their waited-for descendants (`getrusage(RUSAGE_CHILDREN)`): the delta over one
/// pgbench or h2load run is that load generator's CPU, threads included, as long as no other child
/// ends meanwhile (cellgate, Redis and the cluster run on).
pub fn children_cpu_us() -> Option<f64> {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to an rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return None;
    }
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    Some(us(ru.ru_utime) + us(ru.ru_stime))
}

/// CPU time the whole machine spent busy (user, nice, system, irq, softirq of the `cpu` line of
/// /proc/stat; idle, iowait and steal left out), µs summed over all cores.
pub fn machine_busy_us() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    Some(busy as f64 / hz() * 1e6)
}

/// Local ports of the TCP sockets a process has open (its fds' socket inodes looked up in
/// /proc/<pid>/net/tcp and tcp6): which PostgreSQL sessions (`client_port`) are whose.
pub fn tcp_local_ports(pid: u32) -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(local), Some(inode)) = (f.get(1), f.get(9))
                && inodes.contains(*inode)
                && let Some(port) = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// A `kB` field of /proc/<pid>/status (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

/// Number of open file descriptors.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// "soft / hard" of `Max open files` in /proc/<pid>/limits.
pub fn nofile_limit(pid: u32) -> Option<(String, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let f: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    Some((f.first()?.to_string(), f.get(1)?.to_string()))
}

/// Raise this process's soft open-file limit to its hard limit (children inherit it).
/// Returns (before, after) soft limits.
pub fn raise_nofile() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return (0, 0);
    }
    let before = r.rlim_cur;
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
        // SAFETY: valid pointer to an rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    (before, r.rlim_cur)
}

/// Send a signal to one process by PID.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a PID we started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A child process that is stopped (SIGINT, then SIGKILL after `grace`) when dropped.
pub struct Guard {
    pub child: Child,
    grace: Duration,
}

impl Guard {
    pub fn new(child: Child, grace: Duration) -> Guard {
        Guard { child, grace }
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.alive() {
            return;
        }
        signal(self.child.id(), libc::SIGINT);
        let t = Instant::now();
        while t.elapsed() < self.grace {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The other programs that used CPU during a run.
#[derive(Debug, Clone, Default)]
pub struct Noise {
    /// CPU of processes outside our own tree (runner, its children, the cluster's postmasters and
    /// their backends; kernel threads excluded), in cores averaged over the run.
    pub other_cores: f64,
    /// The biggest of them: (command, cores).
    pub top: Vec<(String, f64)>,
    pub load1_start: f64,
    pub load1_end: f64,
    /// CPU time the hypervisor gave to other guests (steal in /proc/stat), in cores.
    pub steal_cores: f64,
}

impl Noise {
    /// Cores taken by others: processes outside our tree plus hypervisor steal.
    pub fn cores(&self) -> f64 {
        self.other_cores + self.steal_cores
    }
    pub fn describe(&self) -> String {
        let top: Vec<String> = self.top.iter().take(3).map(|(c, v)| format!("{c} {v:.2}")).collect();
        format!(
            "others {:.2} cores{}; steal {:.2} cores; load1 {:.2}→{:.2}",
            self.other_cores,
            if top.is_empty() { String::new() } else { format!(" ({})", top.join(", ")) },
            self.steal_cores,
            self.load1_start,
            self.load1_end
        )
    }
}

/// What the sampler saw.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub rss_max_kib: Option<u64>,
    pub fds_max: Option<u64>,
    pub noise: Noise,
}

/// Steal ticks of all CPUs (8th value of the `cpu` line of /proc/stat).
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next()?.split_whitespace().nth(8)?.parse().ok())
        .unwrap_or(0)
}

pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Every process: pid → (ppid, comm, ticks).
fn all_procs() -> HashMap<u32, (u32, String, u64)> {
    let mut m = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(s) = stat(pid)
            {
                m.insert(pid, s);
            }
        }
    }
    m
}

/// Our processes: the roots and all their descendants.
fn ours(procs: &HashMap<u32, (u32, String, u64)>, roots: &[u32]) -> HashSet<u32> {
    let mut set: HashSet<u32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (pid, (ppid, _, _)) in procs {
            if set.contains(ppid) {
                set.insert(*pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

fn is_kernel_thread(pid: u32, ppid: u32) -> bool {
    pid == 2 || ppid == 2
}

/// Samples cellgate's RSS and fds and other programs' CPU every `interval` until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Samples>>,
}

impl Sampler {
    pub fn start(cellgate: Option<u32>, roots: Vec<u32>, interval: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let hz = hz();
            let t0 = Instant::now();
            let load1_start = load1();
            let steal0 = steal_ticks();
            let mut prev = all_procs();
            let mut by_comm: HashMap<String, u64> = HashMap::new();
            let mut other_ticks = 0u64;
            let mut s = Samples::default();
            let sample_cg = |s: &mut Samples| {
                if let Some(pid) = cellgate {
                    if let Some(r) = status_kib(pid, "VmRSS") {
                        s.rss_max_kib = Some(s.rss_max_kib.unwrap_or(0).max(r));
                    }
                    if let Some(f) = fd_count(pid) {
                        s.fds_max = Some(s.fds_max.unwrap_or(0).max(f));
                    }
                }
            };
            sample_cg(&mut s);
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                if !stopping {
                    // Sleep in small steps so stop() returns quickly.
                    let until = Instant::now() + interval;
                    while Instant::now() < until && !flag.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                sample_cg(&mut s);
                let now = all_procs();
                let mine = ours(&now, &roots);
                for (pid, (ppid, comm, ticks)) in &now {
                    if mine.contains(pid) || is_kernel_thread(*pid, *ppid) {
                        continue;
                    }
                    let d = match prev.get(pid) {
                        Some((_, c, t)) if c == comm => ticks.saturating_sub(*t),
                        _ => *ticks,
                    };
                    if d > 0 {
                        other_ticks += d;
                        *by_comm.entry(comm.clone()).or_default() += d;
                    }
                }
                prev = now;
                if stopping || flag.load(Ordering::Relaxed) {
                    break;
                }
            }
            let secs = t0.elapsed().as_secs_f64().max(1e-3);
            let mut top: Vec<(String, f64)> =
                by_comm.into_iter().map(|(c, t)| (c, t as f64 / hz / secs)).filter(|(_, v)| *v >= 0.01).collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            s.noise = Noise {
                other_cores: other_ticks as f64 / hz / secs,
                top,
                load1_start,
                load1_end: load1(),
                steal_cores: steal_ticks().saturating_sub(steal0) as f64 / hz / secs,
            };
            s
        });
        Sampler { stop, handle: Some(handle) }
    }

    pub fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An executable: `$ENV` if set, else `name` on PATH, else one of `fallbacks`.
pub fn find_program(env: &str, name: &str, fallbacks: &[&str]) -> Option<String> {
    if let Ok(p) = std::env::var(env)
        && !p.is_empty()
    {
        return Some(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Some(p.display().to_string());
        }
    }
    fallbacks.iter().find(|p| Path::new(p).is_file()).map(|p| p.to_string())
}
