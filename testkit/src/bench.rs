//! What benches share: whether this is a real measurement, their settings, threads with a
//! runtime of their own, and a process's memory and descriptors from `/proc`.

use std::future::Future;

/// Whether this is a real `cargo bench` run. `cargo test --all-targets` runs bench targets
/// too (without `--bench`): a full measurement there would cost minutes of CI for nothing.
pub fn measuring() -> bool {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        println!("skipped: run with `cargo bench` to measure");
    }
    bench
}

/// A bench's settings by lower-case name: environment variables `<PREFIX>NAME=value`, then
/// (winning) arguments `--name value` or `--name=value` (dashes become underscores). `cargo
/// bench` passes `--bench`, and libtest-style filters are ignored.
pub fn settings(prefix: &str) -> std::collections::BTreeMap<String, String> {
    let mut given: std::collections::BTreeMap<String, String> = std::env::vars()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_ascii_lowercase(), v)))
        .collect();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(name) = a.strip_prefix("--") else {
            continue;
        };
        if name == "bench" {
            continue;
        }
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => match args.next() {
                Some(v) => (name.to_owned(), v),
                None => continue,
            },
        };
        given.insert(name.replace('-', "_").to_ascii_lowercase(), value);
    }
    given
}

/// Setting `name` of [`settings`] as a number, `default` when absent; panics naming it when
/// it is not one.
pub fn number(given: &std::collections::BTreeMap<String, String>, name: &str, default: u64) -> u64 {
    given.get(name).map_or(default, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
    })
}

/// Runs `f` on a new thread with its own current-thread runtime.
pub fn on_thread<F, Fut>(name: &str, f: F) -> std::thread::JoinHandle<Fut::Output>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future,
    Fut::Output: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
        .expect("spawn thread")
}

/// Resident memory of process `pid`, in bytes (`VmRSS` of `/proc/<pid>/status`); `None` once
/// it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS")
}

/// Of [`rss_bytes`]: the anonymous part (`RssAnon`: heap, stacks, what the process itself
/// holds) and the file-backed part (`RssFile`: the binary's code and data pages read in as they
/// are first used, shared with the page cache and dropped by the kernel under pressure).
pub fn rss_parts(pid: u32) -> Option<(u64, u64)> {
    Some((status_bytes(pid, "RssAnon")?, status_bytes(pid, "RssFile")?))
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Open file descriptors of process `pid` (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// CPU time (user and system, all threads) process `pid` has used, in seconds: utime and
/// stime of `/proc/<pid>/stat`, in clock ticks of `USER_HZ` (100 on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: count from its closing parenthesis (field 3 on).
    let mut after_name = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = after_name.next()?.parse().ok()?;
    let stime: u64 = after_name.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Threads of process `pid` (`Threads:` of `/proc/<pid>/status`).
pub fn threads(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Reads one `GET` answer (200 expected, the admin key sent) to the end: body bytes, and the
/// time from sending to the last byte.
pub async fn get_to_end(c: &reqwest::Client, url: &str) -> (u64, std::time::Duration) {
    let t0 = std::time::Instant::now();
    let mut r = c
        .get(url)
        .header("X-API-Key", crate::ADMIN_KEY)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200, "{url}");
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await.expect("body") {
        n += chunk.len() as u64;
    }
    (n, t0.elapsed())
}

/// One `GET` (the admin key sent, `expect` the status) read to the end: milliseconds.
pub async fn get_ms(c: &reqwest::Client, url: &str, expect: u16) -> f64 {
    let t0 = std::time::Instant::now();
    let r = c
        .get(url)
        .header("X-API-Key", crate::ADMIN_KEY)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), expect, "{url}");
    let _ = r.bytes().await.expect("body");
    crate::stats::ms(t0.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert!(threads(pid).is_some_and(|n| n >= 1));
        assert_eq!(cpu_seconds(u32::MAX), None);
        assert_eq!(threads(u32::MAX), None);
        let rss = rss_bytes(pid).expect("our own VmRSS");
        let (anon, file) = rss_parts(pid).expect("our own RssAnon and RssFile");
        assert!(anon > 0 && file > 0, "anonymous {anon}, file-backed {file}");
        // VmRSS is their sum with RssShmem, read a moment apart: allow a few pages of drift.
        assert!(
            anon + file <= rss + (1 << 20),
            "{anon} + {file} against {rss}"
        );
        assert_eq!(rss_bytes(u32::MAX), None);
        assert_eq!(rss_parts(u32::MAX), None);
    }
}
