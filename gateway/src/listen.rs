//! Binding the public ports: the API's and the tunnel listener's.
//!
//! `std` and tokio bind with a listen backlog of 128. Under a flood of connects (or an
//! accept loop that is a moment behind) the kernel's queue of finished handshakes overflows
//! at that depth and drops the SYNs or final ACKs that do not fit; a real agent's connect is
//! then answered only at its SYN retransmission, a second or more later (`nstat
//! TcpExtListenOverflows` counts them). The public ports ask for [`BACKLOG`] instead, which
//! the kernel caps at `net.core.somaxconn` (4096 on current kernels).

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog of the public ports.
pub const BACKLOG: i32 = 4096;

/// Binds `addr` as `std::net::TcpListener::bind` does (address reuse on Unix, blocking),
/// with a backlog of [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with(addr, false)
}

/// [`bind`], with `SO_REUSEPORT` when `shared`: several processes of one node listen on
/// the same port, each with a listener of its own, and the kernel spreads new connections
/// over them by a hash of their addresses (one process holds at most its open-file limit of
/// connections). Every process sharing a port must ask for it, as the same user.
pub fn bind_with(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if shared {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    if shared {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a shared port (SO_REUSEPORT) needs a Unix system",
        ));
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn binds_with_a_deep_backlog_and_accepts() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // More connects than std's 128 complete without anyone accepting (with a backlog of
        // 128 the 130th waits for SYN retransmissions, and fails here).
        let clients: Vec<_> = (0..300)
            .map(|_| {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
                    .unwrap()
            })
            .collect();
        assert_eq!(clients.len(), 300);
        let (_conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), addr.ip());
    }

    #[test]
    fn a_shared_port_takes_several_listeners_and_spreads_connections_over_them() {
        let first = bind_with("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_with(addr, true).unwrap();
        // One that does not share cannot join them.
        assert_eq!(bind(addr).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        // Connections from many source ports land on both listeners.
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut got = [0usize; 2];
        for (i, l) in [&first, &second].into_iter().enumerate() {
            l.set_nonblocking(true).unwrap();
            while l.accept().is_ok() {
                got[i] += 1;
            }
        }
        assert_eq!(got[0] + got[1], clients.len(), "{got:?}");
        assert!(got[0] > 0 && got[1] > 0, "{got:?}");
    }

    #[test]
    fn a_port_in_use_is_an_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let e = bind(first.local_addr().unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}
