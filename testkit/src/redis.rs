//! A throwaway `redis-server` on a free port of 127.0.0.1, without persistence (or with an
//! append-only file, for outages), killed on drop. One per test keeps tests independent and
//! lets them run in parallel.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wait::free_port;

/// How long a fresh `redis-server` may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Fresh ports tried before giving up (another process may grab the port we picked between
/// probing it and redis-server binding it).
const START_ATTEMPTS: usize = 5;

pub struct RedisServer {
    child: Child,
    port: u16,
    // Working dir of the server (and its log); removed on drop, after the process is gone.
    dir: tempfile::TempDir,
    /// Persistence as `ops/redis.md` recommends (AOF, fsync every second).
    aof: bool,
}

impl RedisServer {
    /// Starts the server and returns once it answers PING.
    ///
    /// Panics if `redis-server` is not installed or does not come up.
    pub fn start() -> RedisServer {
        Self::start_persisting(false)
    }

    /// [`RedisServer::start`] with an append-only file (`appendfsync everysec`), as
    /// `ops/redis.md` recommends: what it held survives [`RedisServer::stop`] and
    /// [`RedisServer::restart`].
    pub fn start_with_aof() -> RedisServer {
        Self::start_persisting(true)
    }

    fn start_persisting(aof: bool) -> RedisServer {
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let dir = tempfile::tempdir().expect("create a temp dir for redis-server");
            let child = spawn(port, &dir, aof);
            let mut server = RedisServer {
                child,
                port,
                dir,
                aof,
            };
            match server.wait_until_ready() {
                Ok(()) => return server,
                // Dropping `server` kills the process; try another port.
                Err(why) => last_failure = format!("{why}; log:\n{}", server.log()),
            }
        }
        panic!("redis-server did not start after {START_ATTEMPTS} attempts: {last_failure}");
    }

    /// Stops the server the way an operator does (`SHUTDOWN` on SIGTERM: the AOF is
    /// written out), and waits until it is gone.
    pub fn stop(&mut self) {
        crate::process::terminate(&mut self.child, READY_TIMEOUT);
    }

    /// Starts the server again on the same port and data (after [`RedisServer::stop`]), and
    /// returns once it answers PING (having loaded its AOF).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, &self.dir, self.aof);
        if let Err(why) = self.wait_until_ready() {
            panic!(
                "redis-server did not come back: {why}; log:\n{}",
                self.log()
            );
        }
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Polls PING with a bounded total time; fails early if the process exits (port taken).
    fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("redis-server exited with {status}"));
            }
            if ping(self.port).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("no PONG within {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(port: u16, dir: &tempfile::TempDir, aof: bool) -> Child {
    let log = dir.path().join("redis.log");
    let spawned = Command::new("redis-server")
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(if aof {
            ["--appendonly", "yes", "--appendfsync", "everysec"].as_slice()
        } else {
            ["--appendonly", "no"].as_slice()
        })
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`redis-server` is not installed (not found on PATH); the Redis tests need \
             a real server: run `apt-get install -y redis-server`"
        ),
        Err(e) => panic!("cannot spawn redis-server: {e}"),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw RESP PING, so that readiness does not depend on the client library under test.
pub fn ping(port: u16) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply)?;
    if &reply == b"+PONG\r\n" {
        Ok(())
    } else {
        // e.g. "-LOADING" while the server is still starting.
        Err(std::io::Error::other(format!(
            "unexpected reply {:?}",
            String::from_utf8_lossy(&reply)
        )))
    }
}
