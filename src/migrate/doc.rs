//! The persisted and reported record of one migration: its state machine (states, which are
//! terminal, what the operator does next in each) and the fields design §4 names. No I/O.

use serde::{Deserialize, Serialize};

/// Serialised as the strings the admin API and the persisted records have always used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Planned,
    Copying,
    CatchingUp,
    Cutover,
    /// Terminal: the target owns the cells.
    Done,
    /// The operator aborted; the undo is running (or was interrupted: `resume` or `abort` again).
    Aborting,
    /// Terminal: undone, the source owns the cells.
    Aborted,
    /// Terminal: stopped before its fence; the source owns the cells. `cleanup_pending` says
    /// whether undo work is left (then `abort` retries it). Never blocks later migrations.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Planned => "planned",
            State::Copying => "copying",
            State::CatchingUp => "catching_up",
            State::Cutover => "cutover",
            State::Done => "done",
            State::Aborting => "aborting",
            State::Aborted => "aborted",
            State::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Done | State::Aborted | State::Failed)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The persisted and reported state of one migration (design §4 fields, plus what resume needs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Doc {
    pub id: String,
    pub state: State,
    pub cells: Vec<String>,
    pub from: String,
    pub to: String,
    /// `db.table` of every moved table.
    pub tables: Vec<String>,
    pub rows_copied: u64,
    pub lag_bytes: Option<u64>,
    pub hold_ms: u64,
    /// Longest time writes to the moving cells were held (freeze → release), ms.
    pub hold_ms_max: Option<u64>,
    pub map_version_before: u64,
    pub map_version_after: Option<u64>,
    /// The first error that stopped the migration (server message and SQLSTATE, secrets
    /// masked), followed by any cleanup error.
    pub error: Option<String>,
    /// The fence is committed on the source (from then on the source refuses writes to the cells).
    pub fenced: bool,
    /// Peers that did not acknowledge a freeze, map push or release.
    #[serde(default)]
    pub peer_problems: Vec<String>,
    /// Undo work (replication objects, copied rows, the source's fence) failed and is left:
    /// `abort` retries it.
    #[serde(default)]
    pub cleanup_pending: bool,
    /// An orchestrator task of the answering process works on it now (reported, never read
    /// back from a persisted record).
    #[serde(default, skip_deserializing)]
    pub running: bool,
}

impl Doc {
    pub fn terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// Is an orchestrator expected to act on it (a run, an abort or a resume)? Only these count
    /// for the one-at-a-time rule.
    pub fn active(&self) -> bool {
        !self.terminal()
    }

    /// What the operator does next, for `cellgate migrate status`.
    pub fn next_step(&self) -> String {
        let running = self.running;
        let id = &self.id;
        match self.state {
            State::Done => "nothing: the target owns the cells. Optionally delete the moved rows from the source (docs/migrations.md step 6).".into(),
            State::Aborted => "nothing: the source owns the cells; a new migration may start.".into(),
            State::Failed if self.cleanup_pending => format!(
                "fix the cause in `error`, then `cellgate migrate abort {id}` to retry the cleanup. The source owns the cells; a new migration may start meanwhile."
            ),
            State::Failed => "fix the cause in `error` and start a new migration; the source owns the cells and nothing is left to clean up.".into(),
            _ if running => match self.state {
                State::Aborting => "wait: the undo is running.".into(),
                State::Cutover => format!("wait: writes to the cells are held for up to {} ms.", self.hold_ms),
                _ => format!("wait (or `cellgate migrate abort {id}`)."),
            },
            State::Aborting => format!("`cellgate migrate abort {id}` (or resume) to finish the undo."),
            _ if self.map_version_after.is_some() => format!(
                "`cellgate migrate resume {id}`: the map is published, only the cleanup is left (abort is refused)."
            ),
            _ if self.fenced => format!(
                "`cellgate migrate resume {id}` to finish, or `cellgate migrate abort {id}` to give the cells back to the source. Until then writes to the cells are refused (503 cells_frozen)."
            ),
            _ => format!("`cellgate migrate resume {id}` or `cellgate migrate abort {id}`."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialise_as_before() {
        let all = [
            (State::Planned, "planned"),
            (State::Copying, "copying"),
            (State::CatchingUp, "catching_up"),
            (State::Cutover, "cutover"),
            (State::Done, "done"),
            (State::Aborting, "aborting"),
            (State::Aborted, "aborted"),
            (State::Failed, "failed"),
        ];
        for (s, text) in all {
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(text));
            assert_eq!(s.as_str(), text);
            assert_eq!(serde_json::from_value::<State>(serde_json::json!(text)).unwrap(), s);
        }
        let terminal: Vec<&str> = all.iter().filter(|(s, _)| s.is_terminal()).map(|(_, t)| *t).collect();
        // The persisted-record query of `recover` lists exactly these.
        assert_eq!(terminal, ["done", "aborted", "failed"]);
        assert!(super::super::sql::UNFINISHED.contains("('done', 'aborted', 'failed')"));
    }

    #[test]
    fn failed_never_counts_as_active_and_says_what_next() {
        let mut d: Doc = serde_json::from_value(serde_json::json!({
            "id": "m1", "state": "failed", "cells": [], "from": "a", "to": "b", "tables": [],
            "rows_copied": 0, "lag_bytes": null, "hold_ms": 1, "hold_ms_max": null,
            "map_version_before": 1, "map_version_after": null, "error": "x", "fenced": false
        }))
        .unwrap();
        assert!(!d.active());
        assert!(d.next_step().contains("start a new migration"));
        d.cleanup_pending = true;
        assert!(!d.active());
        assert!(d.next_step().contains("migrate abort m1"));
        d.state = State::Cutover;
        d.fenced = true;
        assert!(d.active());
        assert!(d.next_step().contains("resume m1"));
        d.running = true;
        assert!(d.next_step().starts_with("wait"));
    }
}
