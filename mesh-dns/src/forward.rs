//! Forwarding of names that are not ours to upstream resolvers, with a bounded cache that
//! honours TTLs.
//!
//! Each query goes out on a fresh ephemeral UDP socket (so IDs never collide), retried over
//! TCP when the answer is truncated, across the upstreams in order, within one overall
//! deadline: a slow or dead upstream costs its client a SERVFAIL, never anyone else a wait.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{LowerName, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Answers are cached at most this long, whatever their TTL, and negative answers (and
/// answers without records) this long too.
const MAX_CACHE_TTL: Duration = Duration::from_secs(300);
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream exchange failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream answer could not be read: {0}")]
    Decode(String),
}

/// An upstream answer, as cached.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub response_code: ResponseCode,
    pub message: Message,
    stored: Instant,
    expires: Instant,
}

impl Upstream {
    /// When it leaves the cache.
    #[must_use]
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// The answer with TTLs lowered by the time it spent in the cache.
    #[must_use]
    pub fn aged(&self) -> Message {
        let age = u32::try_from(self.stored.elapsed().as_secs()).unwrap_or(u32::MAX);
        let mut m = self.message.clone();
        for r in m.answers.iter_mut().chain(m.authorities.iter_mut()).chain(m.additionals.iter_mut()) {
            r.ttl = r.ttl.saturating_sub(age);
        }
        m
    }
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    capacity: usize,
    cache: Mutex<HashMap<(LowerName, RecordType), Upstream>>,
}

impl Forwarder {
    #[must_use]
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration, capacity: usize) -> Self {
        Self { upstreams, timeout, capacity, cache: Mutex::new(HashMap::new()) }
    }

    /// A cached answer that has not expired.
    pub fn cached(&self, name: &LowerName, qtype: RecordType) -> Option<Upstream> {
        let cache = self.cache.lock().expect("dns cache lock");
        cache.get(&(name.clone(), qtype)).filter(|u| u.expires > Instant::now()).cloned()
    }

    /// Asks the upstreams, caches the answer, returns it.
    pub async fn resolve(&self, name: &LowerName, qtype: RecordType) -> Result<Upstream, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let mut query = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from(name), qtype));
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        query.set_edns(edns);
        let bytes = query.to_vec().map_err(|e| ForwardError::Decode(e.to_string()))?;

        let deadline = tokio::time::Instant::now() + self.timeout;
        let per_try = self.timeout / u32::try_from(self.upstreams.len()).unwrap_or(1).max(1);
        let mut last = ForwardError::Timeout(self.timeout);
        for upstream in &self.upstreams {
            let attempt = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + per_try),
                exchange(*upstream, &bytes, query.metadata.id),
            );
            match attempt.await {
                Ok(Ok(message)) => {
                    let upstream = self.store(name, qtype, message);
                    return Ok(upstream);
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = ForwardError::Timeout(self.timeout),
            }
        }
        Err(last)
    }

    fn store(&self, name: &LowerName, qtype: RecordType, message: Message) -> Upstream {
        let min_ttl = message.answers.iter().chain(message.authorities.iter()).map(|r| r.ttl).min();
        let ttl = match (message.metadata.response_code, min_ttl) {
            (ResponseCode::NoError, Some(ttl)) if !message.answers.is_empty() => {
                Duration::from_secs(u64::from(ttl)).min(MAX_CACHE_TTL)
            }
            (ResponseCode::NoError | ResponseCode::NXDomain, ttl) => {
                Duration::from_secs(u64::from(ttl.unwrap_or(30))).min(NEGATIVE_TTL)
            }
            // SERVFAIL and the like are not cached.
            _ => Duration::ZERO,
        };
        let now = Instant::now();
        let upstream = Upstream {
            response_code: message.metadata.response_code,
            message,
            stored: now,
            expires: now + ttl,
        };
        if !ttl.is_zero() {
            let mut cache = self.cache.lock().expect("dns cache lock");
            if cache.len() >= self.capacity {
                cache.retain(|_, u| u.expires > now);
                if cache.len() >= self.capacity {
                    // Still full of live answers: drop one (any) to stay bounded.
                    if let Some(key) = cache.keys().next().cloned() {
                        cache.remove(&key);
                    }
                }
            }
            cache.insert((name.clone(), qtype), upstream.clone());
        }
        upstream
    }
}

/// One query to one upstream: UDP, then TCP if the answer was truncated.
async fn exchange(upstream: SocketAddr, query: &[u8], id: u16) -> Result<Message, ForwardError> {
    let bind: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 4096];
    let message = loop {
        let n = socket.recv(&mut buf).await?;
        match Message::from_vec(&buf[..n]) {
            // Ignore stray datagrams that are not the answer to this query.
            Ok(m) if m.metadata.id == id && m.metadata.message_type == MessageType::Response => break m,
            Ok(_) | Err(_) => {}
        }
    };
    if !message.metadata.truncation {
        return Ok(message);
    }
    let mut tcp = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| ForwardError::Decode("query too long".into()))?;
    tcp.write_all(&len.to_be_bytes()).await?;
    tcp.write_all(query).await?;
    let len = tcp.read_u16().await?;
    let mut answer = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut answer).await?;
    Message::from_vec(&answer).map_err(|e| ForwardError::Decode(e.to_string()))
}

/// The nameservers of a resolv.conf text, leaving out loopback ones that could be us.
#[must_use]
pub fn resolv_conf_upstreams(text: &str, own_port: u16) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| !(ip.is_loopback() && own_port == 53))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text =
            "search x\nnameserver 10.0.0.2\nnameserver 127.0.0.53\n# nameserver 1.1.1.1\nnameserver bogus\n";
        assert_eq!(resolv_conf_upstreams(text, 53), vec!["10.0.0.2:53".parse().unwrap()]);
        assert_eq!(resolv_conf_upstreams(text, 5353).len(), 2);
    }
}
