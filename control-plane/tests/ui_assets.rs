#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The web console's assets in `control-plane/ui/dist/` (embedded in the binary, so running
//! the control plane needs no Node.js) are exactly what their sources build: a clean copy of
//! `control-plane/ui` (without `node_modules/` and `dist/`) is installed from its lockfile
//! (`npm ci`) and built (`npm run build`: type check and the console's unit tests, then
//! esbuild), and every file of the fresh `dist/` must equal the committed one byte for byte.
//!
//! Needs Node.js and npm (Debian's `nodejs` and `npm`); without them the test fails, saying
//! so. `npm ci` takes packages from npm's cache (`~/.npm`) when it has them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ui")
}

/// Directories of `control-plane/ui` that are outputs or local state, never sources.
const SKIPPED: &[&str] = &["node_modules", "dist", "e2e/artifacts", "e2e/screenshots"];

fn copy_sources(from: &Path, to: &Path, rel: &Path) {
    std::fs::create_dir_all(to.join(rel)).unwrap();
    for entry in std::fs::read_dir(from.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let path = rel.join(entry.file_name());
        let name = path.to_string_lossy().replace('\\', "/");
        if SKIPPED.contains(&name.as_str()) || entry.file_name() == "node_modules" {
            continue;
        }
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_sources(from, to, &path);
        } else if kind.is_file() {
            std::fs::copy(from.join(&path), to.join(&path)).unwrap();
        }
    }
}

/// Fails the test with a clear message when `tool` cannot run at all.
fn require(tool: &str) -> String {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => panic!(
            "`{tool} --version` failed ({}): {}; the web console's assets are checked with Node.js \
             and npm (Debian: apt-get install nodejs npm)",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "`{tool}` cannot run ({e}): the test that checks the web console's committed assets \
             against their sources needs Node.js and npm (Debian: apt-get install nodejs npm)"
        ),
    }
}

fn run(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .env("npm_config_update_notifier", "false")
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false")
        .env("CI", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run npm {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`npm {}` failed in a copy of control-plane/ui ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn committed_console_assets_are_what_the_sources_build() {
    let node = require("node");
    let npm = require("npm");
    let src = ui_dir();
    let committed = src.join("dist");
    assert!(
        committed.join("index.html").is_file(),
        "{} has no index.html: build the console (cd control-plane/ui && npm ci && npm run build) and commit dist/",
        committed.display()
    );

    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("ui");
    copy_sources(&src, &copy, Path::new(""));
    run(
        &copy,
        &["ci", "--prefer-offline", "--no-audit", "--no-fund"],
    );
    run(&copy, &["run", "build"]);
    let built = copy.join("dist");

    let old = files(&committed);
    let new = files(&built);
    let mut problems = Vec::new();
    for name in old.union(&new) {
        match (old.contains(name), new.contains(name)) {
            (true, false) => problems.push(format!(
                "{name}: committed, but the build makes no such file"
            )),
            (false, true) => problems.push(format!("{name}: built, but not committed")),
            _ => {
                let a = std::fs::read(committed.join(name)).unwrap();
                let b = std::fs::read(built.join(name)).unwrap();
                if a != b {
                    let at = a
                        .iter()
                        .zip(&b)
                        .position(|(x, y)| x != y)
                        .unwrap_or(a.len().min(b.len()));
                    problems.push(format!(
                        "{name}: differs (committed {} B, built {} B, first difference at byte {at})",
                        a.len(),
                        b.len()
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "control-plane/ui/dist is not what its sources build (node {node}, npm {npm}):\n  {}\n\
         rebuild it (cd control-plane/ui && npm ci && npm run build) and commit dist/",
        problems.join("\n  ")
    );
}
