//! Process helpers for the harness: running external programs with a timeout, checking and
//! signalling PIDs, reading `postmaster.pid`. Touches only processes and files it is handed.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Captured result of a finished command.
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Human-readable rendering of a command line (program + args), for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_word(a));
    }
    s
}

fn shell_word(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c)) {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` to completion, feeding `stdin` (if any) and capturing stdout/stderr, killing it
/// if it runs longer than `timeout`. `Err` carries a message (spawn failure or timeout).
pub(crate) fn run(mut cmd: Command, stdin: Option<String>, timeout: Duration) -> Result<Output, String> {
    let what = describe(&cmd);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("could not run `{what}`: {e}"))?;

    if let (Some(mut w), Some(input)) = (child.stdin.take(), stdin) {
        thread::spawn(move || {
            let _ = w.write_all(input.as_bytes());
            // dropping `w` closes the pipe: EOF for the child
        });
    }
    let out_rx = spawn_reader(child.stdout.take());
    let err_rx = spawn_reader(child.stderr.take());

    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for `{what}` failed: {e}"));
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    // A grandchild may still hold the pipes; don't wait for it forever.
    let collect = |rx: mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| "<output unavailable: pipe still held open>".to_string())
    };
    let stdout = collect(out_rx);
    let stderr = collect(err_rx);
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => Err(format!("`{what}` timed out after {timeout:?} and was killed; stderr: {}", stderr.trim())),
    }
}

fn spawn_reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// True if `pid` names a live (non-zombie) process. Zombies count as dead: on machines whose
/// init does not reap orphans, a stopped postmaster stays a zombie forever.
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence/permission.
    let r = unsafe { libc::kill(raw, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // format: "pid (comm) S ..." - the state follows the last ')'
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(true),
        // vanished in between (or no procfs at all: then trust kill)
        Err(_) => !Path::new("/proc/self/stat").exists(),
    }
}

/// True if `pid` is (most likely) a PostgreSQL server process. Guards against signalling an
/// unrelated process that reused the PID written in a stale `postmaster.pid`.
pub(crate) fn is_postgres(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => {
            let comm = comm.trim();
            comm == "postgres" || comm == "postmaster"
        }
        // no procfs (not Linux): trust the pid file
        Err(_) => !Path::new("/proc/self/comm").exists(),
    }
}

/// Sends `sig` to `pid`; false if that failed (e.g. no such process).
pub(crate) fn signal(pid: u32, sig: i32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // SAFETY: plain kill(2) on a positive pid.
    unsafe { libc::kill(raw, sig) == 0 }
}

/// PID from the first line of `<data_dir>/postmaster.pid`, if the file exists and parses.
pub(crate) fn read_postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// The PID of the running postmaster of `data_dir`, if any.
pub(crate) fn running_postmaster(data_dir: &Path) -> Option<u32> {
    read_postmaster_pid(data_dir).filter(|&pid| alive(pid) && is_postgres(pid))
}

/// Polls until none of `pids` is alive or `timeout` passes; returns the ones still alive.
pub(crate) fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
