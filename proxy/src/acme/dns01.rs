//! DNS-01 validation (RFC 8555, 8.4), the only challenge that proves a wildcard: the TXT
//! record `_acme-challenge.<name>` carries the digest of the key authorization.
//!
//! Two publishers: mesh-dns itself (the user delegates the `_acme-challenge` names to the
//! cluster once, and no node holds DNS-provider credentials; in a cluster the issuer's values
//! reach every node's mesh-dns through the feed), or RFC 2136 dynamic updates signed with TSIG
//! to the user's own authoritative server ([`super::rfc2136`]). Before the CA is asked to
//! validate, the record is looked up at the configured resolvers until each of them answers
//! the value, within `acme.dns_propagation_timeout`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::challenges::{Answer, Challenges};
use super::order::{Failure, Reason};
use super::rfc2136::{Rfc2136, Withdraw};
use super::AcmeConfig;
use crate::invalid::Invalid;

/// Who publishes the DNS-01 TXT records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
pub enum DnsProvider {
    /// mesh-dns answers them (needs `dns.listen`, and the names delegated to the cluster).
    #[default]
    #[serde(rename = "mesh-dns")]
    #[value(name = "mesh-dns")]
    MeshDns,
    /// RFC 2136 dynamic updates to `acme.rfc2136_server`.
    #[serde(rename = "rfc2136")]
    #[value(name = "rfc2136")]
    Rfc2136,
}

/// The record holding `name`'s challenge: `_acme-challenge.example.com` for `example.com`
/// and for `*.example.com` alike.
#[must_use]
pub fn record_name(name: &str) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    format!("_acme-challenge.{}", name.strip_prefix("*.").unwrap_or(&name))
}

/// How this agent publishes and checks DNS-01 records.
#[derive(Debug)]
pub struct Dns01 {
    publisher: Publisher,
    /// Where the record must be seen before the CA is asked.
    resolvers: Vec<SocketAddr>,
    timeout: Duration,
}

#[derive(Debug)]
enum Publisher {
    MeshDns,
    Rfc2136(Arc<Rfc2136>),
}

/// A published TXT value; withdrawn when dropped.
pub enum Published {
    Local(#[allow(dead_code, reason = "held for its Drop")] Answer),
    Update(#[allow(dead_code, reason = "held for its Drop")] Withdraw),
}

impl Dns01 {
    /// DNS-01 as configured, or `None` where it cannot work: the mesh-dns publisher without
    /// `dns.listen` (`dns_listen`). Wildcard names are then not ordered.
    pub fn new(cfg: &AcmeConfig, dns_listen: Option<SocketAddr>) -> Result<Option<Self>, Invalid> {
        let (publisher, own) = match cfg.dns_provider {
            DnsProvider::MeshDns => match dns_listen {
                Some(listen) => (Publisher::MeshDns, reachable(listen)),
                None => return Ok(None),
            },
            DnsProvider::Rfc2136 => {
                let updater = Rfc2136::from_config(cfg)?;
                let server = updater.server();
                (Publisher::Rfc2136(Arc::new(updater)), server)
            }
        };
        let resolvers = if cfg.dns_resolvers.is_empty() { vec![own] } else { cfg.dns_resolvers.clone() };
        Ok(Some(Self { publisher, resolvers, timeout: cfg.dns_propagation_timeout }))
    }

    /// Publishes `value` under `record` (`_acme-challenge.<name>`).
    pub async fn publish(
        &self,
        challenges: &Arc<Challenges>,
        record: &str,
        value: &str,
    ) -> Result<Published, Failure> {
        match &self.publisher {
            Publisher::MeshDns => Ok(Published::Local(challenges.add_dns(record, value))),
            Publisher::Rfc2136(updater) => {
                updater.add(record, value).await.map(Published::Update).map_err(|e| {
                    Failure::new(Reason::ChallengeFailed, format!("DNS update of {record}: {e}"))
                })
            }
        }
    }

    /// Waits until every resolver answers `value` for `record`, at most the propagation
    /// timeout; the error names the resolver and what it last said.
    pub async fn wait_until_seen(&self, record: &str, value: &str) -> Result<(), Failure> {
        let name = Name::from_str(&format!("{}.", record.trim_end_matches('.')))
            .map_err(|e| Failure::new(Reason::ChallengeFailed, format!("{record} is not a DNS name: {e}")))?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        for resolver in &self.resolvers {
            let mut pause = Duration::from_millis(100);
            loop {
                let said = match txt_values(*resolver, &name).await {
                    Ok(values) if values.iter().any(|v| v == value) => break,
                    Ok(values) if values.is_empty() => "no TXT record".to_owned(),
                    Ok(values) => format!("other values ({})", values.join(", ")),
                    Err(e) => e,
                };
                if tokio::time::Instant::now() + pause > deadline {
                    return Err(Failure::new(
                        Reason::ChallengeFailed,
                        format!(
                            "the TXT record {record} was not seen at {resolver} within {} (it answered: {said}); \
                             check the delegation of {record} (docs/https.md, DNS-01)",
                            humantime::format_duration(self.timeout)
                        ),
                    ));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
        Ok(())
    }
}

/// An address to reach a listener on: its own, or loopback for a wildcard address.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
        _ => listen,
    }
}

/// How long one lookup may take.
const LOOKUP: Duration = Duration::from_secs(2);

/// The TXT values `resolver` answers for `name` (over UDP, again over TCP when truncated).
async fn txt_values(resolver: SocketAddr, name: &Name) -> Result<Vec<String>, String> {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name.clone(), RecordType::TXT));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(LOOKUP, async {
        let mut response = over_udp(resolver, &bytes, query.metadata.id).await?;
        if response.metadata.truncation {
            response = over_tcp(resolver, &bytes).await?;
        }
        Ok::<_, String>(response)
    })
    .await
    .map_err(|_| format!("no answer within {LOOKUP:?}"))??;
    let code = answer.metadata.response_code;
    if code != hickory_proto::op::ResponseCode::NoError && code != hickory_proto::op::ResponseCode::NXDomain {
        return Err(code.to_string());
    }
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => {
                Some(txt.txt_data.iter().map(|part| String::from_utf8_lossy(part)).collect::<String>())
            }
            _ => None,
        })
        .collect())
}

async fn over_udp(resolver: SocketAddr, query: &[u8], id: u16) -> Result<Message, String> {
    let local: SocketAddr = if resolver.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = tokio::net::UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.send_to(query, resolver).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0; 4096];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await.map_err(|e| e.to_string())?;
        if from != resolver {
            continue;
        }
        match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.id == id => return Ok(m),
            _ => {}
        }
    }
}

/// One DNS message over TCP (RFC 1035 4.2.2: a two-byte length before each message).
pub(super) async fn over_tcp(server: SocketAddr, message: &[u8]) -> Result<Message, String> {
    let bytes = exchange_tcp(server, message).await?;
    Message::from_vec(&bytes).map_err(|e| format!("an answer that does not parse: {e}"))
}

/// Sends `message` to `server` over TCP and reads one answer's bytes.
pub(super) async fn exchange_tcp(server: SocketAddr, message: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = tokio::net::TcpStream::connect(server).await.map_err(|e| e.to_string())?;
    let len = u16::try_from(message.len()).map_err(|_| "a message over 64 KiB".to_owned())?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    let len = stream.read_u16().await.map_err(|e| e.to_string())?;
    let mut answer = vec![0; usize::from(len)];
    stream.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_and_its_base_share_one_record() {
        assert_eq!(record_name("*.Example.com."), "_acme-challenge.example.com");
        assert_eq!(record_name("example.com"), "_acme-challenge.example.com");
        assert_eq!(reachable("0.0.0.0:53".parse().unwrap()), "127.0.0.1:53".parse().unwrap());
        assert_eq!(reachable("[::]:53".parse().unwrap()), "[::1]:53".parse().unwrap());
        assert_eq!(reachable("10.0.0.1:53".parse().unwrap()), "10.0.0.1:53".parse().unwrap());
    }
}
