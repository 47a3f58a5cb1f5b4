//! [`Socket`]: a TCP stream that can move to another runtime of the process. tokio registers a
//! socket with the reactor of the runtime that created it, and that reactor's thread is the
//! one woken when it is ready; a connection handed to another runtime (see [`crate::Spawn`])
//! re-registers there first ([`Socket::rehome`]), from inside the TLS stream that wraps it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Socket(Option<TcpStream>);

impl Socket {
    pub fn new(tcp: TcpStream) -> Self {
        Self(Some(tcp))
    }

    /// Registers the socket with the current runtime's reactor. Call it from the runtime that
    /// will poll it, before polling it there. On failure the socket is closed.
    pub fn rehome(&mut self) -> io::Result<()> {
        let tcp = self.0.take().ok_or_else(gone)?;
        let tcp = TcpStream::from_std(tcp.into_std()?)?;
        self.0 = Some(tcp);
        Ok(())
    }

    fn tcp(self: Pin<&mut Self>) -> io::Result<Pin<&mut TcpStream>> {
        match &mut self.get_mut().0 {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(gone()),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "socket lost while moving between threads",
    )
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|t| t.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket moved to another runtime (its first runtime gone meanwhile) carries on there.
    #[test]
    fn a_socket_moved_to_another_runtime_carries_on() {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut socket, peer) = first.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
            let mut socket = Socket::new(accepted.unwrap().0);
            let mut peer = client.unwrap();
            peer.write_all(b"one").await.unwrap();
            let mut buf = [0u8; 3];
            socket.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"one");
            (socket, peer.into_std().unwrap())
        });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            socket.rehome().unwrap();
            let mut peer = TcpStream::from_std(peer).unwrap();
            let mut buf = [0u8; 3];
            let (wrote, read) = tokio::join!(peer.write_all(b"two"), socket.read_exact(&mut buf));
            wrote.unwrap();
            read.unwrap();
            assert_eq!(&buf, b"two");
            socket.write_all(b"back").await.unwrap();
            let mut buf = [0u8; 4];
            peer.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"back");
        });
    }
}
