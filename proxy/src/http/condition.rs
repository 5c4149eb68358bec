//! A route's conditions ([`crate::state::Condition`]) compiled, and tested against a request.

use std::net::IpAddr;

use http::{HeaderMap, Method};
use regex::Regex;

use crate::state::{Condition, HostPattern, Test};

/// What a route's conditions look at.
pub struct Ask<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub client: IpAddr,
}

/// The conditions of one route, all of which must hold.
#[derive(Clone, Default)]
pub struct Conditions(std::sync::Arc<[(bool, Compiled)]>);

enum Compiled {
    Method(Vec<Method>),
    Header(http::HeaderName, String),
    HeaderRegexp(http::HeaderName, Regex),
    Query(String, Option<String>),
    QueryRegexp(String, Regex),
    ClientIp(Vec<ipnet::IpNet>),
    Path(String),
    PathPrefix(String),
    PathRegexp(Regex),
    Host(Vec<HostPattern>, Vec<Regex>),
}

fn regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("`{pattern}` is not a regular expression: {e}"))
}

fn header(name: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("`{name}` is not a header name"))
}

impl Conditions {
    /// # Errors
    /// A regex, header name or method that is not one.
    pub fn compile(conditions: &[Condition]) -> Result<Self, String> {
        let mut out = Vec::with_capacity(conditions.len());
        for c in conditions {
            let compiled = match &c.test {
                Test::Method { methods } => Compiled::Method(
                    methods
                        .iter()
                        .map(|m| {
                            Method::from_bytes(m.as_bytes()).map_err(|_| format!("`{m}` is not a method"))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                Test::Header { name, value } => Compiled::Header(header(name)?, value.clone()),
                Test::HeaderRegexp { name, regex: r } => Compiled::HeaderRegexp(header(name)?, regex(r)?),
                Test::Query { key, value } => Compiled::Query(key.clone(), value.clone()),
                Test::QueryRegexp { key, regex: r } => Compiled::QueryRegexp(key.clone(), regex(r)?),
                Test::ClientIp { networks } => Compiled::ClientIp(networks.clone()),
                Test::Path { path } => Compiled::Path(path.clone()),
                Test::PathPrefix { prefix } => Compiled::PathPrefix(prefix.clone()),
                Test::PathRegexp { regex: r } => Compiled::PathRegexp(regex(r)?),
                Test::Host { hosts } => {
                    let regexes = hosts
                        .iter()
                        .filter_map(|h| match h {
                            HostPattern::Regex(r) => Some(regex(r)),
                            _ => None,
                        })
                        .collect::<Result<_, _>>()?;
                    Compiled::Host(hosts.clone(), regexes)
                }
            };
            out.push((c.negated, compiled));
        }
        Ok(Self(out.into()))
    }

    /// Whether `ask` meets every condition.
    #[must_use]
    pub fn hold(&self, ask: &Ask<'_>) -> bool {
        self.0.iter().all(|(negated, c)| c.holds(ask) != *negated)
    }
}

/// The values of `key` in a query string (not percent-decoded but for `+`, as written).
fn query_values<'a>(query: Option<&'a str>, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query.unwrap_or("").split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

impl Compiled {
    fn holds(&self, ask: &Ask<'_>) -> bool {
        match self {
            Self::Method(methods) => methods.contains(ask.method),
            Self::Header(name, value) => {
                ask.headers.get_all(name).iter().any(|v| v.as_bytes() == value.as_bytes())
            }
            Self::HeaderRegexp(name, re) => {
                ask.headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| re.is_match(v)))
            }
            Self::Query(key, value) => {
                let mut values = query_values(ask.query, key);
                match value {
                    None => values.next().is_some(),
                    Some(want) => values.any(|v| v == want),
                }
            }
            Self::QueryRegexp(key, re) => query_values(ask.query, key).any(|v| re.is_match(v)),
            Self::ClientIp(networks) => networks.iter().any(|n| n.contains(&ask.client)),
            Self::Path(path) => ask.path == path,
            Self::PathPrefix(prefix) => ask.path.starts_with(prefix.as_str()),
            Self::PathRegexp(re) => re.is_match(ask.path),
            Self::Host(hosts, regexes) => {
                let host = super::router::normalise_host(ask.host);
                regexes.iter().any(|r| r.is_match(&host))
                    || hosts.iter().any(|h| match h {
                        HostPattern::Exact(e) => *e == host,
                        HostPattern::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
                        HostPattern::Prefix(p) => host.starts_with(p.as_str()) && host.len() > p.len(),
                        HostPattern::Regex(_) => false,
                    })
            }
        }
    }
}
