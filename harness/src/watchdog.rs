//! Per-cluster watchdog: a tiny `/bin/sh` child that cleans up a cluster's temp root (stops its
//! postmasters, removes the directory) if the owning process dies without running `Drop`
//! (SIGKILL, abort, `process::exit`). It only touches postmasters whose `postmaster.pid` lies
//! under that one root.
//!
//! How it notices: its stdin is a pipe whose only write end is held by the owner (Rust opens
//! pipes close-on-exec, so no other child inherits it). When the owner dies for any reason the
//! kernel closes that end, the script's `read` returns and the cleanup runs. The normal path
//! (`Drop`) cleans up itself first and then SIGKILLs the watchdog's process group.

use std::io;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use std::os::unix::process::CommandExt;

/// `$1` is the cluster root. Runs in its own process group, ignoring SIGHUP/SIGINT so a Ctrl-C
/// on the terminal that kills the owner does not also kill the cleaner.
const SCRIPT: &str = r#"
trap '' HUP INT
read _line
root=$1
pids=
for f in "$root"/*/data/postmaster.pid; do
  [ -f "$f" ] || continue
  pid=$(head -n 1 "$f" 2>/dev/null)
  case "$pid" in ''|*[!0-9]*) continue ;; esac
  [ "$(cat /proc/$pid/comm 2>/dev/null)" = postgres ] || continue
  kill -QUIT "$pid" 2>/dev/null && pids="$pids $pid"
done
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  case "$(cat /proc/$1/stat 2>/dev/null)" in *") Z "*) return 1 ;; esac
  return 0
}
i=0
while [ $i -lt 100 ]; do
  left=
  for p in $pids; do alive "$p" && left=1; done
  [ -z "$left" ] && break
  sleep 0.1
  i=$((i+1))
done
for p in $pids; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
n=0
while [ -e "$root" ] && [ $n -lt 20 ]; do
  rm -rf "$root" 2>/dev/null
  [ -e "$root" ] && sleep 0.5
  n=$((n+1))
done
"#;

/// Handle to a running watchdog; see the module docs.
pub(crate) struct Watchdog {
    child: Child,
    /// Held only to keep the pipe open; closing it triggers the cleanup.
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts the watchdog for `root`.
    pub(crate) fn spawn(root: &Path) -> io::Result<Watchdog> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("cellgate-harness-watchdog")
            .arg(root)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        Ok(Watchdog { child, stdin })
    }

    /// Kills the watchdog (and its `sleep`, via the process group) without letting it run its
    /// cleanup, and reaps it.
    pub(crate) fn disarm(mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling the process group we created (pgid == pid of the shell).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        // Reap; SIGKILL cannot be ignored, so this returns promptly.
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(self.stdin.take());
    }
}
