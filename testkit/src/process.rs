//! The workspace's own binaries for tests that run the real thing: where they are (and that
//! they are not older than their sources), and stopping them gracefully.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

use crate::wait::wait_exit;

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

/// The path of workspace binary `name` of the test's own profile; `cargo test --workspace`
/// builds every one first. Building it from inside a test would run a second cargo, with other
/// features, under the running one; so a binary that is missing, or older than a source it is
/// built from, fails the test with the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    static CHECKED: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut checked = checked.lock();
    if let Some(path) = checked.get(name) {
        return path.clone();
    }
    let dir = profile_dir();
    let path = dir.join(name);
    let _ = sources_of(name); // an unknown name fails here, not as "not built"
    let release = dir.file_name().and_then(|n| n.to_str()) == Some("release");
    // The whole workspace: `-p <package>` would build it with other features (the store's
    // backends are unified across the workspace) and may leave an older copy in place.
    let build = if release {
        "cargo build --release --workspace --bins"
    } else {
        "cargo test --workspace --no-run (or the whole `cargo test --workspace`)"
    };
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

/// A source file `binary` is built from that changed after it was built: Rust and Lua files
/// of its crate's and its workspace dependencies' `src/` (`tests.rs` files are test-only
/// modules). A file changed after this test was built too is left to cargo: the test itself
/// is older than it, and the next `cargo test` rebuilds both.
fn newer_source(binary: &Path, name: &str) -> Option<PathBuf> {
    let built = modified(binary)?;
    let test_built = std::env::current_exe().ok().as_deref().and_then(modified);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let code = sources_of(name)
        .iter()
        .flat_map(|krate| files(&root.join(krate).join("src")))
        .filter(|f| {
            let ext = f.extension().and_then(|e| e.to_str());
            matches!(ext, Some("rs" | "lua"))
                && f.file_name().and_then(|n| n.to_str()) != Some("tests.rs")
        });
    // The web console's built files are embedded in the control plane (its build.rs).
    let embedded = match name {
        "control-plane" => files(&root.join("control-plane/ui/dist")),
        _ => Vec::new(),
    };
    code.chain(embedded)
        .find(|f| modified(f).is_some_and(|m| m > built && test_built.is_none_or(|t| m <= t)))
}

/// The workspace crates a binary is built from.
fn sources_of(bin: &str) -> &'static [&'static str] {
    match bin {
        "control-plane" => &["proto", "store", "gateway", "control-plane"],
        "tunnel-gateway" => &["proto", "store", "gateway", "tunnel-gateway"],
        "edge-agent" => &["proto", "edge-agent"],
        "loadtest" => &["proto", "edge-agent", "loadtest"],
        other => panic!("{other} is not a binary of this workspace"),
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

/// Sends SIGTERM to `child` (a graceful stop), without waiting.
pub fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Sends SIGTERM, then SIGKILL if the process has not exited within `grace`; `true` if it
/// exited by itself.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    sigterm(child);
    let graceful = wait_exit(child, grace);
    if !graceful {
        let _ = child.kill();
        let _ = child.wait();
    }
    graceful
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crates each binary is checked against are the workspace crates its package
    /// depends on, directly or not (read from the manifests, so a new dependency cannot be
    /// forgotten here).
    #[test]
    fn sources_follow_the_manifests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let workspace = ["proto", "store", "gateway", "control-plane", "edge-agent"];
        let deps_of = |krate: &str| -> Vec<&'static str> {
            let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
            let normal = manifest
                .split("\n[")
                .find(|section| section.starts_with("dependencies]"))
                .unwrap_or_default();
            workspace
                .iter()
                .copied()
                .filter(|dep| {
                    normal.lines().any(|l| {
                        l.starts_with(&format!("{dep} ")) || l.starts_with(&format!("{dep}."))
                    })
                })
                .collect()
        };
        for bin in ["control-plane", "tunnel-gateway", "edge-agent", "loadtest"] {
            let mut want = vec![bin];
            let mut i = 0;
            while i < want.len() {
                for dep in deps_of(want[i]) {
                    if !want.contains(&dep) {
                        want.push(dep);
                    }
                }
                i += 1;
            }
            want.sort_unstable();
            let mut have = sources_of(bin).to_vec();
            have.sort_unstable();
            assert_eq!(have, want, "sources_of({bin:?})");
        }
    }
}
