//! What async mode must not forget across restarts: the highest command id finished, the one
//! being run, and results the server has not acknowledged yet. Kept in
//! `<EDGE_DATA_DIR>/commands.json`, rewritten atomically before a command runs and after it
//! finished, so a command is never run twice: the server may hand it out again (delivery is
//! at-least-once), but an id at or below `done_through` is never executed again, and its
//! result travels until it is acknowledged.
//!
//! A command that was running when the agent stopped (power cut, crash) is not run again:
//! its outcome is unknown, and it is reported failed with that reason.

use std::io;
use std::path::{Path, PathBuf};

use proto::async_mode::{clip_error, CommandResult};
use serde::{Deserialize, Serialize};

use crate::edge_id::write_atomically;

/// File name in the data dir.
pub const JOURNAL_FILE: &str = "commands.json";
/// Most results kept for sending; older ones are dropped (with a warning) beyond it.
pub const MAX_OUTBOX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read the command journal {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the command journal {path} is corrupt ({detail}); move it away to start afresh (commands already run may then be reported again as failed)")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot write the command journal in {dir}: {source}")]
    Write { dir: PathBuf, source: io::Error },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    done_through: u64,
    running: Option<u64>,
    outbox: Vec<CommandResult>,
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    state: State,
}

impl Journal {
    /// Opens (or starts) the journal in `dir`. A command left running is reported failed.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let path = dir.join(JOURNAL_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(JournalError::Read { path, source }),
        };
        let mut journal = Self {
            dir: dir.to_owned(),
            state,
        };
        if let Some(id) = journal.state.running.take() {
            tracing::warn!(
                command = id,
                "the agent stopped while a command was running; it is reported failed, not run again"
            );
            journal.push_result(CommandResult {
                id,
                error: Some(
                    "the agent stopped while this command was running; its outcome is unknown"
                        .to_owned(),
                ),
            });
            journal.state.done_through = journal.state.done_through.max(id);
            journal.save()?;
        }
        Ok(journal)
    }

    /// The highest command id finished (0: none).
    pub fn done_through(&self) -> u64 {
        self.state.done_through
    }

    /// Whether command `id` still has to run.
    pub fn is_new(&self, id: u64) -> bool {
        id > self.state.done_through
    }

    /// Results not yet acknowledged, oldest first.
    pub fn outbox(&self) -> &[CommandResult] {
        &self.state.outbox
    }

    /// Records that `id` starts now (before it touches the engine).
    pub fn begin(&mut self, id: u64) -> Result<(), JournalError> {
        self.state.running = Some(id);
        self.save()
    }

    /// Records the outcome of the command begun last.
    pub fn finish(&mut self, id: u64, error: Option<String>) -> Result<(), JournalError> {
        self.state.running = None;
        self.state.done_through = self.state.done_through.max(id);
        self.push_result(CommandResult {
            id,
            error: error.map(clip_error),
        });
        self.save()
    }

    /// The server took these results: they need not be sent again.
    pub fn acknowledge(&mut self, sent: &[CommandResult]) -> Result<(), JournalError> {
        if sent.is_empty() {
            return Ok(());
        }
        let before = self.state.outbox.len();
        self.state
            .outbox
            .retain(|r| !sent.iter().any(|s| s.id == r.id));
        if self.state.outbox.len() != before {
            self.save()?;
        }
        Ok(())
    }

    fn push_result(&mut self, result: CommandResult) {
        if self.state.outbox.len() >= MAX_OUTBOX {
            let dropped = self.state.outbox.remove(0);
            tracing::warn!(
                command = dropped.id,
                "too many unacknowledged command results; dropping the oldest"
            );
        }
        self.state.outbox.push(result);
    }

    fn save(&self) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(&self.state).map_err(|e| JournalError::Write {
            dir: self.dir.clone(),
            source: io::Error::other(e),
        })?;
        write_atomically(&self.dir, JOURNAL_FILE, &bytes).map_err(|source| JournalError::Write {
            dir: self.dir.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn results_survive_a_restart_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.is_new(1));
        j.begin(1).unwrap();
        j.finish(1, None).unwrap();
        j.begin(2).unwrap();
        j.finish(2, Some("No such container: web".into())).unwrap();
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.done_through(), 2);
        assert!(!j.is_new(2) && j.is_new(3));
        assert_eq!(j.outbox().len(), 2);
        let sent = j.outbox()[..1].to_vec();
        j.acknowledge(&sent).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.outbox().iter().map(|r| r.id).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn a_command_interrupted_by_a_crash_is_reported_failed_not_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.begin(7).unwrap();
        drop(j); // the process dies here
        let j = Journal::open(dir.path()).unwrap();
        assert!(!j.is_new(7));
        let r = &j.outbox()[0];
        assert_eq!(r.id, 7);
        assert!(r.error.as_deref().unwrap().contains("outcome is unknown"));
        // Reported once, not again at the next start.
        drop(j);
        assert_eq!(Journal::open(dir.path()).unwrap().outbox().len(), 1);
    }

    #[test]
    fn a_corrupt_journal_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOURNAL_FILE), b"{not json").unwrap();
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("move it away"), "{e}");
    }
}
