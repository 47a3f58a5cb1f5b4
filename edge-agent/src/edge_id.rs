//! The agent's Edge ID: given, or generated once and kept in the data directory.
//!
//! Losing the Edge ID after a restart is a known Portainer pain (the environment then refuses
//! the agent as a stranger), so the file is written atomically and a corrupt file is an error,
//! never silently replaced.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// Name of the file inside `EDGE_DATA_DIR`.
pub const EDGE_ID_FILE: &str = "edge_id";

/// Where the Edge ID in use came from (logged at startup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeIdSource {
    /// `EDGE_ID` was set.
    Configured,
    /// Read from the data directory.
    Persisted,
    /// Generated now and written to the data directory.
    Generated,
}

impl EdgeIdSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configured => "configured",
            Self::Persisted => "persisted",
            Self::Generated => "generated",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeIdError {
    #[error("cannot read the Edge ID file {path} (check EDGE_DATA_DIR, or set EDGE_ID): {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the Edge ID file {path} does not hold a UUID; fix or remove it, or set EDGE_ID")]
    Corrupt { path: PathBuf },
    #[error("cannot persist the Edge ID in {dir} (set EDGE_DATA_DIR to a writable directory, or set EDGE_ID): {source}")]
    Write { dir: PathBuf, source: io::Error },
}

/// Returns the Edge ID to use: `configured` if set, else the persisted one, else a new UUIDv4
/// that is persisted before it is returned.
pub fn resolve(
    configured: Option<Uuid>,
    data_dir: &Path,
) -> Result<(Uuid, EdgeIdSource), EdgeIdError> {
    if let Some(id) = configured {
        return Ok((id, EdgeIdSource::Configured));
    }
    let path = data_dir.join(EDGE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Uuid::parse_str(text.trim())
            .map(|id| (id, EdgeIdSource::Persisted))
            .map_err(|_| EdgeIdError::Corrupt { path }),
        // NotADirectory: a path component is a file; creating the directory will say so.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            let id = Uuid::new_v4();
            persist(data_dir, id).map_err(|source| EdgeIdError::Write {
                dir: data_dir.to_owned(),
                source,
            })?;
            Ok((id, EdgeIdSource::Generated))
        }
        Err(source) => Err(EdgeIdError::Read { path, source }),
    }
}

/// Writes `<dir>/edge_id` atomically.
fn persist(dir: &Path, id: Uuid) -> io::Result<()> {
    write_atomically(dir, EDGE_ID_FILE, format!("{id}\n").as_bytes())
}

/// Writes `<dir>/<name>` atomically: a temporary file in the same directory, fsynced, then
/// renamed over the target, so a crash leaves either the old file or the whole new one.
pub(crate) fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, dir.join(name))?;
        // Make the rename itself durable; not every filesystem allows syncing a directory.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_wins_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        assert_eq!(
            resolve(Some(id), dir.path()).unwrap(),
            (id, EdgeIdSource::Configured)
        );
        assert!(!dir.path().join(EDGE_ID_FILE).exists());
    }

    #[test]
    fn generated_once_then_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested/data");
        let (first, src) = resolve(None, &data).unwrap();
        assert_eq!(src, EdgeIdSource::Generated);
        assert_eq!(first.get_version_num(), 4);
        let (again, src) = resolve(None, &data).unwrap();
        assert_eq!((again, src), (first, EdgeIdSource::Persisted));
        // Only the final file remains: no temporary left behind.
        let names: Vec<_> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(EDGE_ID_FILE)]);
    }

    #[test]
    fn persisted_file_tolerates_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        fs::write(dir.path().join(EDGE_ID_FILE), format!("  {id}\n\n")).unwrap();
        assert_eq!(
            resolve(None, dir.path()).unwrap(),
            (id, EdgeIdSource::Persisted)
        );
    }

    #[test]
    fn corrupt_file_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EDGE_ID_FILE);
        fs::write(&path, "garbage").unwrap();
        let err = resolve(None, dir.path()).unwrap_err();
        assert!(matches!(err, EdgeIdError::Corrupt { .. }));
        assert_eq!(fs::read_to_string(&path).unwrap(), "garbage");
    }

    #[test]
    fn unwritable_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the directory should be: fails even when running as root.
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, "x").unwrap();
        let err = resolve(None, &blocker.join("data")).unwrap_err();
        assert!(matches!(err, EdgeIdError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("EDGE_DATA_DIR"));
    }
}
