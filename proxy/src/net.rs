//! Sockets the agent listens on, and accepting on them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A bound, non-blocking socket; with `reuse_port`, several agents on one host can hold the
/// same address at once (the kernel spreads new connections and datagrams between them),
/// which is how an agent is replaced without a moment where nobody listens.
pub fn reusable_socket(
    addr: SocketAddr,
    kind: socket2::Type,
    reuse_port: bool,
) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    if kind == socket2::Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A TCP listener, see [`reusable_socket`]. Needs a Tokio runtime.
pub fn reusable_listener(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = reusable_socket(addr, socket2::Type::STREAM, reuse_port)?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// A bound TCP socket that takes no connection until [`Bound::listen`]: with `SO_REUSEPORT`
/// the kernel hands a listening agent its share of new connections, so a new agent listens
/// only once it can answer them (the address is claimed, and a conflict reported, at once).
pub struct Bound(socket2::Socket);

impl Bound {
    pub fn new(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Self> {
        reusable_socket(addr, socket2::Type::STREAM, reuse_port).map(Self)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP socket"))
    }

    /// Starts taking connections. Needs a Tokio runtime.
    pub fn listen(self) -> std::io::Result<TcpListener> {
        self.0.listen(1024)?;
        TcpListener::from_std(self.0.into())
    }
}

/// A listener: TCP, or a Unix socket.
pub trait Accept {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Peer;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send {
        self.accept()
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(UnixStream, Self::Peer)>> + Send {
        self.accept()
    }
}

/// How long a listener rests after a failed accept.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The next connection on `listener` (`what` names it in the log). A failed accept (out of
/// file descriptors, most often: the listener stays readable) is logged and retried after
/// a pause, so a full descriptor table never makes a listener spin; connections already
/// open go on meanwhile and free descriptors as they end.
pub async fn accept<L: Accept>(listener: &L, what: &'static str) -> (L::Stream, L::Peer) {
    loop {
        match listener.accept_one().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(listener = what, "accept failed: {e}; pausing {ACCEPT_PAUSE:?}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

/// A stream that calls `on_read` with the size of each read that brought bytes (a request
/// head arriving, a tunnel's traffic); writes pass through.
pub struct OnRead<S, F> {
    inner: S,
    on_read: F,
}

impl<S, F: FnMut(usize)> OnRead<S, F> {
    pub fn new(inner: S, on_read: F) -> Self {
        Self { inner, on_read }
    }
}

impl<S: AsyncRead + Unpin, F: FnMut(usize) + Unpin> AsyncRead for OnRead<S, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            (self.on_read)(n);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin, F: Unpin> AsyncWrite for OnRead<S, F> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
