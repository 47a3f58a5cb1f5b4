//! A minimal Docker Engine API on plain TCP, for benches and load tests that need an engine
//! behind the tunnel but not a real one: `GET /_ping`, `GET /bulk?bytes=N` (N zero bytes),
//! and just enough for the agent's snapshot (`/version`, `/info`, empty lists). Kept-alive
//! HTTP/1.1, one request at a time per connection.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::bench::on_thread;

/// The largest write of a `/bulk` answer.
pub const CHUNK: usize = 256 * 1024;

/// Starts the engine on a thread of its own (its own runtime) on a free loopback port.
pub fn start() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind engine");
    let addr = listener.local_addr().expect("engine addr");
    listener.set_nonblocking(true).expect("nonblocking");
    on_thread("engine", move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("engine listener");
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(sock).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Answers the requests of one connection until it closes.
pub async fn serve(mut sock: TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let zeros = vec![0u8; CHUNK];
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 || sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = buf.split_to(end);
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let mut lines = head.split("\r\n");
        let request = lines.next().unwrap_or_default().to_owned();
        let mut close = false;
        let mut body_len = 0usize;
        for l in lines {
            if let Some((name, value)) = l.split_once(':') {
                match name.trim() {
                    "connection" => close |= value.contains("close"),
                    "content-length" => body_len = value.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        // Discard a request body (none expected).
        while body_len > 0 {
            if buf.is_empty() && sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            let n = body_len.min(buf.len());
            let _ = buf.split_to(n);
            body_len -= n;
        }
        let target = request.split(' ').nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        // The proxy may prefix an API version (`/v1.47/_ping`).
        let path = match path.strip_prefix("/v1.") {
            Some(rest) => rest.find('/').map_or(path, |i| &rest[i..]),
            None => path,
        };
        match path {
            "/_ping" => {
                sock.write_all(
                    b"HTTP/1.1 200 OK\r\nApi-Version: 1.47\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK",
                )
                .await?;
            }
            "/bulk" => {
                let n: u64 = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("bytes="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
                );
                sock.write_all(head.as_bytes()).await?;
                let mut left = n;
                while left > 0 {
                    let k = (left as usize).min(CHUNK);
                    sock.write_all(&zeros[..k]).await?;
                    left -= k as u64;
                }
            }
            _ => {
                let (status, body) = match path {
                    "/version" => (
                        "200 OK",
                        r#"{"Version":"27.0.0-bench","ApiVersion":"1.47","Os":"linux","Arch":"amd64"}"#,
                    ),
                    "/info" => ("200 OK", r#"{"Name":"bench-engine","NCPU":2}"#),
                    "/containers/json" | "/images/json" | "/networks" => ("200 OK", "[]"),
                    "/volumes" => ("200 OK", r#"{"Volumes":[]}"#),
                    _ => ("404 Not Found", r#"{"message":"page not found"}"#),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(answer.as_bytes()).await?;
            }
        }
        if close {
            let _ = sock.shutdown().await;
            return Ok(());
        }
    }
}
