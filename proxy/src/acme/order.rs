//! One certificate order, start to finish: new order, one challenge per name, wait for the
//! CA's validation, finalize with a fresh key, download the chain. Every failure is
//! classified, because the reason decides the log line, the metric label and the retry.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};

use super::challenges::{Answer, Challenges};
use super::dns01::{self, Dns01, Published};
use super::ChallengeKind;

/// Why an order failed; the label of `meshgate_acme_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No answer, a refused connection, a TLS error, a timeout.
    CaUnreachable,
    /// The CA said `rateLimited`.
    RateLimited,
    /// The CA could not validate a challenge (DNS not pointing here, port closed, ...).
    ChallengeFailed,
    /// Any other problem document from the CA.
    CaError,
    /// The store could not be written.
    Storage,
    /// The CA does not know the stored account (it was reset, or deactivated).
    AccountUnknown,
}

impl Reason {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::CaUnreachable => "ca_unreachable",
            Self::RateLimited => "rate_limited",
            Self::ChallengeFailed => "challenge_failed",
            Self::CaError => "ca_error",
            Self::Storage => "storage",
            Self::AccountUnknown => "account_unknown",
        }
    }
}

/// A failed order: why, what the CA said, and when it asked us to come back.
#[derive(Debug)]
pub struct Failure {
    pub reason: Reason,
    pub detail: String,
    pub retry_after: Option<SystemTime>,
}

impl Failure {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into(), retry_after: None }
    }

    /// Classifies an error from instant-acme.
    #[must_use]
    pub fn from_acme(e: &instant_acme::Error) -> Self {
        let reason = match e {
            instant_acme::Error::Api(problem) => {
                match problem.r#type.as_deref().and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:")) {
                    Some("rateLimited") => Reason::RateLimited,
                    Some("accountDoesNotExist") => Reason::AccountUnknown,
                    Some("connection" | "dns" | "incorrectResponse" | "tls" | "unauthorized" | "caa") => {
                        Reason::ChallengeFailed
                    }
                    _ => Reason::CaError,
                }
            }
            instant_acme::Error::Hyper(_)
            | instant_acme::Error::Other(_)
            | instant_acme::Error::Timeout(_) => Reason::CaUnreachable,
            _ => Reason::CaError,
        };
        Self::new(reason, e.to_string())
    }
}

impl Reason {
    /// A failure of the CA itself, where another CA may do better (not a challenge that
    /// failed: the name's own problem, nor the local store).
    #[must_use]
    pub fn is_the_cas(self) -> bool {
        matches!(self, Self::CaUnreachable | Self::RateLimited | Self::CaError | Self::AccountUnknown)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.label(), self.detail)
    }
}

/// A new certificate: the chain and its private key, PEM.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// How long to wait for the CA to validate or to issue before giving the attempt up.
/// How long the issuer waits for the cluster's nodes to confirm a challenge.
const PROPAGATION: Duration = Duration::from_secs(3);
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// Orders one certificate for `names`, answering with `kind` challenges (DNS-01 through
/// `dns01`).
pub async fn order(
    account: &Account,
    names: &[String],
    kind: ChallengeKind,
    challenges: &Arc<Challenges>,
    dns01: Option<&Dns01>,
) -> Result<Issued, Failure> {
    let dns01 =
        match (kind, dns01) {
            (ChallengeKind::Dns01, None) => return Err(Failure::new(
                Reason::CaError,
                "dns-01 needs dns.listen (mesh-dns answers the challenges) or acme.dns_provider = rfc2136",
            )),
            (ChallengeKind::Dns01, Some(dns01)) => Some(dns01),
            _ => None,
        };
    let acme = |e: instant_acme::Error| Failure::from_acme(&e);
    let identifiers: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(acme)?;

    // Answers stay published until this function returns, whichever way.
    let mut answers: Vec<Answer> = Vec::new();
    let mut records: Vec<Published> = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(acme)?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(Failure::new(
                    Reason::ChallengeFailed,
                    format!("authorization for {} is {other:?}", authz.identifier()),
                ))
            }
        }
        let name = authz.identifier().to_string();
        let mut challenge = authz.challenge(kind.acme_type()).ok_or_else(|| {
            Failure::new(Reason::CaError, format!("the CA offers no {} challenge for {name}", kind.label()))
        })?;
        let key_auth = challenge.key_authorization();
        // The identifier of a wildcard authorization is its base name (RFC 8555, 7.1.3).
        let dns_record = dns01::record_name(&name);
        match (kind, dns01) {
            (_, Some(dns01)) => {
                records.push(dns01.publish(challenges, &dns_record, &key_auth.dns_value()).await?);
            }
            (ChallengeKind::TlsAlpn01, None) => {
                answers.push(challenges.add_alpn(&name, key_auth.digest().as_ref()).map_err(|e| {
                    Failure::new(Reason::CaError, format!("cannot make the TLS-ALPN-01 certificate: {e}"))
                })?);
            }
            (_, None) => answers.push(challenges.add_http(&challenge.token, key_auth.as_str())),
        }
        // In a cluster the validation may reach any node: wait until they all answer.
        if !challenges.propagated(PROPAGATION).await {
            tracing::warn!(host = %name, "acme: not every node of the cluster confirmed the challenge within {PROPAGATION:?}; asking the CA to validate anyway");
        }
        if let Some(dns01) = dns01 {
            dns01.wait_until_seen(&dns_record, &key_auth.dns_value()).await?;
        }
        challenge.set_ready().await.map_err(acme)?;
    }

    match order.poll_ready(&POLL).await.map_err(acme)? {
        OrderStatus::Ready => {}
        status => return Err(challenge_failure(&mut order, status).await),
    }
    drop(answers);
    drop(records);
    let key_pem = order.finalize().await.map_err(acme)?;
    let chain_pem = order.poll_certificate(&POLL).await.map_err(acme)?;
    Ok(Issued { chain_pem, key_pem })
}

/// The CA's own words on why validation failed, from the failed challenge.
async fn challenge_failure(order: &mut instant_acme::Order, status: OrderStatus) -> Failure {
    let mut details = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let name = authz.identifier().to_string();
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(problem) = &c.error {
                    details.push(format!(
                        "{name}: {}",
                        problem.detail.as_deref().unwrap_or("validation failed")
                    ));
                }
            }
        }
    }
    if details.is_empty() {
        details.push(format!("the order ended {status:?}"));
    }
    Failure::new(Reason::ChallengeFailed, details.join("; "))
}

impl ChallengeKind {
    fn acme_type(self) -> ChallengeType {
        match self {
            Self::Http01 => ChallengeType::Http01,
            Self::TlsAlpn01 => ChallengeType::TlsAlpn01,
            Self::Dns01 => ChallengeType::Dns01,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: &str) -> instant_acme::Error {
        let json = format!(r#"{{"type":"urn:ietf:params:acme:error:{kind}","detail":"d","status":400}}"#);
        instant_acme::Error::Api(serde_json::from_str(&json).unwrap())
    }

    #[test]
    fn failures_are_classified_by_the_ca_problem_type() {
        // Pebble (the real CA of the tests) has no rate limits: the classification is checked here.
        assert_eq!(Failure::from_acme(&problem("rateLimited")).reason, Reason::RateLimited);
        assert_eq!(Failure::from_acme(&problem("connection")).reason, Reason::ChallengeFailed);
        assert_eq!(Failure::from_acme(&problem("malformed")).reason, Reason::CaError);
        assert_eq!(Failure::from_acme(&problem("accountDoesNotExist")).reason, Reason::AccountUnknown);
        assert_eq!(
            Failure::from_acme(&instant_acme::Error::Other("refused".into())).reason,
            Reason::CaUnreachable
        );
    }
}
