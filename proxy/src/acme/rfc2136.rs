//! DNS-01 records written to the user's authoritative server by RFC 2136 dynamic updates,
//! signed with TSIG (RFC 8945), over TCP. An update adds one TXT value; the value is
//! deleted again (by its data, so another order's value for the same name stays) when the
//! order ends.

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hickory_proto::op::{update_message, Message, ResponseCode};
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType, TSigner};

use super::dns01::exchange_tcp;
use super::AcmeConfig;
use crate::invalid::Invalid;

/// The TTL of a challenge record: short, the CA should not cache an old value.
const TTL: u32 = 60;
/// One update may take this long.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Rfc2136 {
    server: SocketAddr,
    zone: Name,
    signer: Option<TSigner>,
}

impl std::fmt::Debug for Rfc2136 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.signer.as_ref().map(|s| s.signer_name().to_string());
        f.debug_struct("Rfc2136")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("key", &key)
            .finish()
    }
}

impl Rfc2136 {
    /// From `acme.rfc2136_*`; each error names its key.
    pub fn from_config(cfg: &AcmeConfig) -> Result<Self, Invalid> {
        let server = cfg.rfc2136_server.ok_or_else(|| {
            Invalid::new("acme.rfc2136_server", "unset", "the address of your DNS server, e.g. 192.0.2.53:53")
        })?;
        let zone = cfg.rfc2136_zone.as_deref().ok_or_else(|| {
            Invalid::new("acme.rfc2136_zone", "unset", "the zone the records go in, e.g. example.com")
        })?;
        let zone = fqdn(zone).map_err(|e| Invalid::new("acme.rfc2136_zone", zone, e))?;
        let signer = match (&cfg.rfc2136_tsig_key, &cfg.rfc2136_tsig_secret_file) {
            (None, None) => None,
            (Some(key), Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    Invalid::new(
                        "acme.rfc2136_tsig_secret_file",
                        file.display(),
                        format!("a readable file ({e})"),
                    )
                })?;
                let secret = decode_secret(&text).ok_or_else(|| {
                    Invalid::new(
                        "acme.rfc2136_tsig_secret_file",
                        file.display(),
                        "a base64 secret, alone or as the `secret` of a BIND or Knot key file",
                    )
                })?;
                let algorithm =
                    TsigAlgorithm::from_name(Name::from_ascii(&cfg.rfc2136_tsig_algorithm).map_err(|e| {
                        Invalid::new(
                            "acme.rfc2136_tsig_algorithm",
                            &cfg.rfc2136_tsig_algorithm,
                            e.to_string(),
                        )
                    })?);
                let name = fqdn(key).map_err(|e| Invalid::new("acme.rfc2136_tsig_key", key, e))?;
                Some(TSigner::new(secret, algorithm, name, 300).map_err(|e| {
                    Invalid::new(
                        "acme.rfc2136_tsig_algorithm",
                        &cfg.rfc2136_tsig_algorithm,
                        format!("hmac-sha256, hmac-sha384 or hmac-sha512 ({e})"),
                    )
                })?)
            }
            (key, _) => {
                return Err(Invalid::new(
                    if key.is_some() { "acme.rfc2136_tsig_key" } else { "acme.rfc2136_tsig_secret_file" },
                    "set alone",
                    "acme.rfc2136_tsig_key and acme.rfc2136_tsig_secret_file go together",
                ))
            }
        };
        Ok(Self { server, zone, signer })
    }

    #[must_use]
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Adds `value` to the TXT records of `record`; the returned guard deletes it.
    pub async fn add(self: &Arc<Self>, record: &str, value: &str) -> Result<Withdraw, String> {
        let rrset = self.rrset(record, value)?;
        self.send(update_message::append(rrset, self.zone.clone(), false, false)).await?;
        Ok(Withdraw { updater: self.clone(), record: record.to_owned(), value: value.to_owned() })
    }

    async fn delete(&self, record: &str, value: &str) -> Result<(), String> {
        let rrset = self.rrset(record, value)?;
        self.send(update_message::delete_by_rdata(rrset, self.zone.clone(), false)).await
    }

    fn rrset(&self, record: &str, value: &str) -> Result<RecordSet, String> {
        let name = fqdn(record)?;
        if !self.zone.zone_of(&name) {
            return Err(format!("{record} is not in the zone {} (acme.rfc2136_zone)", self.zone));
        }
        let mut rrset = RecordSet::with_ttl(name, RecordType::TXT, TTL);
        rrset.add_rdata(RData::TXT(TXT::new(vec![value.to_owned()])));
        Ok(rrset)
    }

    /// Signs (when a key is set), sends, and checks the server's answer (and its signature).
    async fn send(&self, mut message: Message) -> Result<(), String> {
        let verifier = match &self.signer {
            Some(signer) => {
                let now =
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
                message.finalize(signer, now).map_err(|e| format!("cannot sign the update: {e}"))?
            }
            None => None,
        };
        let bytes = message.to_vec().map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(UPDATE_TIMEOUT, exchange_tcp(self.server, &bytes))
            .await
            .map_err(|_| format!("{} did not answer within {UPDATE_TIMEOUT:?}", self.server))?
            .map_err(|e| format!("{}: {e}", self.server))?;
        let answer = match verifier {
            Some(mut verifier) => verifier
                .verify(&answer)
                .map(hickory_proto::op::DnsResponse::into_message)
                .map_err(|e| format!("the answer of {} is not signed with our key: {e}", self.server))?,
            None => Message::from_vec(&answer).map_err(|e| e.to_string())?,
        };
        match answer.metadata.response_code {
            ResponseCode::NoError => Ok(()),
            code => Err(format!("{} refused the update: {code}", self.server)),
        }
    }
}

/// A TXT value added by an update; deleted when dropped (in the background: the order has
/// ended, nothing waits for it; a failure is logged).
pub struct Withdraw {
    updater: Arc<Rfc2136>,
    record: String,
    value: String,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        let (updater, record, value) = (self.updater.clone(), self.record.clone(), self.value.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = updater.delete(&record, &value).await {
                    tracing::warn!(%record, "acme: the DNS-01 record was not deleted: {e}");
                }
            });
        }
    }
}

fn fqdn(name: &str) -> Result<Name, String> {
    Name::from_str(&format!("{}.", name.trim_end_matches('.'))).map_err(|e| format!("a DNS name ({e})"))
}

/// The base64 secret of a key file: the file itself, or the `secret` of a BIND
/// (`secret "…";`) or Knot (`secret: …`) key definition.
fn decode_secret(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let token = match text.find("secret") {
        Some(at) => text[at + "secret".len()..]
            .trim_start_matches([':', ' ', '\t'])
            .split(|c: char| c.is_whitespace() || c == ';')
            .find(|t| !t.is_empty())?
            .trim_matches('"'),
        None => text.trim(),
    };
    base64::engine::general_purpose::STANDARD.decode(token).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_alone_or_in_bind_and_knot_key_files() {
        let plain = "c2VjcmV0LXNlY3JldA==";
        assert_eq!(decode_secret(plain).unwrap(), b"secret-secret");
        let bind = "key \"acme\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0LXNlY3JldA==\";\n};\n";
        assert_eq!(decode_secret(bind).unwrap(), b"secret-secret");
        let knot = "key:\n  - id: acme\n    algorithm: hmac-sha256\n    secret: c2VjcmV0LXNlY3JldA==\n";
        assert_eq!(decode_secret(knot).unwrap(), b"secret-secret");
        assert!(decode_secret("not base64!").is_none());
    }
}
