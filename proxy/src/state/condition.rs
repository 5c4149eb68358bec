//! What a request must also be, beside its host and path prefix, for a route to take it
//! (Traefik's rule matchers other than `Host` and `PathPrefix`: `Method`, `Header`, `Query`,
//! `ClientIP`, `Path`, `PathRegexp`, and any matcher under `!`). All of a route's conditions
//! must hold.

use serde::{Deserialize, Serialize};

use super::HostPattern;

/// One condition; `negated`: it must not hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub negated: bool,
    #[serde(flatten)]
    pub test: Test,
}

impl Condition {
    #[must_use]
    pub fn is(test: Test) -> Self {
        Self { negated: false, test }
    }

    /// The same test, the other way.
    #[must_use]
    pub fn not(&self) -> Self {
        Self { negated: !self.negated, test: self.test.clone() }
    }
}

/// A test of the request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "test", rename_all = "snake_case")]
pub enum Test {
    /// One of these methods.
    Method { methods: Vec<String> },
    /// The header (lower case) has this value.
    Header { name: String, value: String },
    /// A value of the header matches the regex.
    HeaderRegexp { name: String, regex: String },
    /// The query has `key` (with `value`, when given).
    Query { key: String, value: Option<String> },
    /// A value of `key` matches the regex.
    QueryRegexp { key: String, regex: String },
    /// The client's address is in one of these networks.
    ClientIp { networks: Vec<ipnet::IpNet> },
    /// The path is exactly this.
    Path { path: String },
    /// The path starts with this.
    PathPrefix { prefix: String },
    /// The path matches the regex (searched, as Traefik v3).
    PathRegexp { regex: String },
    /// The host is one of these (a negated `Host`).
    Host { hosts: Vec<HostPattern> },
}
