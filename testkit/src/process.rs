//! The workspace's own binaries for tests that run the real thing: where they are (and that
//! they are not older than their sources), and stopping them gracefully.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

use crate::wait::wait_exit;

/// The package each binary belongs to.
fn package_of(bin: &str) -> &str {
    match bin {
        "control-plane" | "tunnel-gateway" | "edge-agent" | "loadtest" => bin,
        other => panic!("{other} is not a binary of this workspace"),
    }
}

/// The target directory of the running test (`<target>/<profile>`), from its own path
/// (`<target>/<profile>/deps/<test>` or `<target>/<profile>/examples/<name>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let parent = exe.parent().expect("the test executable's directory");
    match parent.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => parent.parent().unwrap_or(parent).to_owned(),
        _ => parent.to_owned(),
    }
}

/// The path of workspace binary `name` of the test's own profile. `cargo test --workspace`
/// (and `cargo test -p <its package>`) builds it first. Building it from inside a test would
/// run a second cargo with other features under the running one, so a binary that is missing,
/// or older than a source it is built from, fails the test with
/// the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    static CHECKED: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut checked = checked.lock();
    if let Some(path) = checked.get(name) {
        return path.clone();
    }
    let dir = profile_dir();
    let path = dir.join(name);
    let release = dir.file_name().and_then(|n| n.to_str()) == Some("release");
    let build = format!(
        "cargo build{} -p {} --bin {name}{}",
        if release { " --release" } else { "" },
        package_of(name),
        if release {
            ""
        } else {
            " (or run the whole `cargo test --workspace`)"
        },
    );
    assert!(path.exists(), "{} is not built: {build}", path.display());
    if let Some(newer) = newer_source(&path, name) {
        panic!(
            "{} is older than {}, which it is built from: {build}",
            path.display(),
            newer.display()
        );
    }
    checked.insert(name.to_owned(), path.clone());
    path
}

/// A source file `binary` is built from that changed after it was built (its crate's and
/// its workspace dependencies' `src/`; `tests.rs` files are test-only modules).
fn newer_source(binary: &Path, name: &str) -> Option<PathBuf> {
    let built = modified(binary)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    sources_of(name)
        .iter()
        .flat_map(|krate| files(&root.join(krate).join("src")))
        .filter(|f| f.file_name().and_then(|n| n.to_str()) != Some("tests.rs"))
        .find(|f| modified(f).is_some_and(|m| m > built))
}

/// The workspace crates a binary is built from.
fn sources_of(bin: &str) -> &'static [&'static str] {
    match bin {
        "control-plane" => &["proto", "store", "gateway", "control-plane"],
        "tunnel-gateway" => &["proto", "store", "gateway", "tunnel-gateway"],
        "edge-agent" => &["proto", "edge-agent"],
        "loadtest" => &["proto", "edge-agent", "loadtest"],
        _ => &[],
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Sends SIGTERM, then SIGKILL if the process has not exited within `grace`; `true` if it
/// exited by itself.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let graceful = wait_exit(child, grace);
    if !graceful {
        let _ = child.kill();
        let _ = child.wait();
    }
    graceful
}

/// A child process killed (and reaped) on drop, so a failing test leaves nothing behind.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
