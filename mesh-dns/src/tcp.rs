//! DNS over TCP, one connection at a time, served here rather than by hickory's listener:
//! the agent accepts (pausing when accepting fails, where hickory's loop spins at descriptor
//! exhaustion) and hands each connection over. Queries on a connection are answered in
//! order, each message length-prefixed (RFC 7766); a client silent for `TCP_IDLE` between
//! queries is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::capture::Capture;
use crate::{MeshDns, TCP_IDLE};

/// Answers the queries of one accepted connection until it closes or idles.
pub async fn serve_connection(handler: Arc<MeshDns>, stream: TcpStream, peer: SocketAddr) {
    let (mut read, mut write) = stream.into_split();
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, read.read_u16()).await else { return };
        let mut message = vec![0u8; usize::from(len)];
        if !matches!(tokio::time::timeout(TCP_IDLE, read.read_exact(&mut message)).await, Ok(Ok(_))) {
            return;
        }
        // Not a DNS message: nothing to answer on this connection (as hickory does).
        let Ok(request) = Request::from_bytes(message, peer, Protocol::Tcp) else { return };
        let capture = Capture::default();
        handler.handle_request::<Capture, TokioTime>(&request, capture.clone()).await;
        let message = capture.take();
        if message.is_empty() {
            continue;
        }
        let mut framed = Vec::with_capacity(message.len() + 2);
        framed.extend_from_slice(&u16::try_from(message.len()).unwrap_or(u16::MAX).to_be_bytes());
        framed.extend_from_slice(&message);
        if write.write_all(&framed).await.is_err() {
            return;
        }
    }
}
