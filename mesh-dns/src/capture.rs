//! The response handler both transports give [`crate::MeshDns`]: it keeps the encoded answer
//! for the transport to send (UDP from its batch or its task, TCP framed with its length).

use std::sync::{Arc, Mutex};

use hickory_server::net::NetError;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;

/// Keeps the encoded answer (empty until one is sent).
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// The answer encoded, if any.
    pub(crate) fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().expect("dns capture lock"))
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
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
        // Encoded from offset 0 (name compression points from the message's start); the
        // handler has made the answer fit the client's size already.
        let mut message = Vec::with_capacity(512);
        let info = {
            let mut encoder = BinEncoder::new(&mut message);
            encoder.set_max_size(u16::MAX);
            response.destructive_emit(&mut encoder)?
        };
        *self.0.lock().expect("dns capture lock") = message;
        Ok(info)
    }
}
