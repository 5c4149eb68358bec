//! mesh-dns: answers service, task and routed host names for a whole node.
//!
//! The server (on hickory-server) arrives with its own issue; this crate already holds the
//! plain data it will serve, so the agent can convert its state into it.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Names and their addresses, lower-case, without the trailing dot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    pub records: BTreeMap<String, Vec<IpAddr>>,
}

impl Zone {
    /// The addresses of `name` (any case, with or without a trailing dot).
    #[must_use]
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.records.get(&name).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_ignores_case_and_trailing_dot() {
        let mut zone = Zone::default();
        zone.records.insert("web.mesh.internal".into(), vec![[10, 0, 0, 1].into()]);
        assert_eq!(zone.lookup("WEB.mesh.internal.").map(<[IpAddr]>::len), Some(1));
        assert!(zone.lookup("db").is_none());
    }
}
