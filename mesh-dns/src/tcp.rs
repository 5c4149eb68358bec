//! DNS over TCP, one connection at a time, served here rather than by hickory's listener:
//! the agent accepts (pausing when accepting fails, where hickory's loop spins at descriptor
//! exhaustion) and hands each connection over. Queries on a connection are answered in
//! order, each message length-prefixed (RFC 7766); a client silent for `TCP_IDLE` between
//! queries is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler as _, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use crate::{MeshDns, TCP_IDLE};

/// Answers the queries of one accepted connection until it closes or idles.
pub async fn serve_connection(handler: Arc<MeshDns>, stream: TcpStream, peer: SocketAddr) {
    let (mut read, write) = stream.into_split();
    let responder = Responder(Arc::new(tokio::sync::Mutex::new(write)));
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, read.read_u16()).await else { return };
        let mut message = vec![0u8; usize::from(len)];
        if !matches!(tokio::time::timeout(TCP_IDLE, read.read_exact(&mut message)).await, Ok(Ok(_))) {
            return;
        }
        // Not a DNS message: nothing to answer on this connection (as hickory does).
        let Ok(request) = Request::from_bytes(message, peer, Protocol::Tcp) else { return };
        handler.handle_request::<Responder, TokioTime>(&request, responder.clone()).await;
    }
}

/// Writes each response, length-prefixed, on the connection it came from.
#[derive(Clone)]
struct Responder(Arc<tokio::sync::Mutex<OwnedWriteHalf>>);

#[async_trait::async_trait]
impl ResponseHandler for Responder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Encoded from offset 0 (name compression points from the message's start), then
        // framed with its length.
        let mut message = Vec::with_capacity(512);
        let info = {
            let mut encoder = BinEncoder::new(&mut message);
            encoder.set_max_size(u16::MAX);
            response.destructive_emit(&mut encoder)?
        };
        let mut framed = Vec::with_capacity(message.len() + 2);
        framed.extend_from_slice(&u16::try_from(message.len()).unwrap_or(u16::MAX).to_be_bytes());
        framed.extend_from_slice(&message);
        self.0.lock().await.write_all(&framed).await?;
        Ok(info)
    }
}
