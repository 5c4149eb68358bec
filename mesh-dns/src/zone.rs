//! The names mesh-dns answers itself: plain data, built whole and swapped in whole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

/// Addresses (and services) of one name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    /// `(port, target)` for SRV names such as `_8080._tcp.web`.
    pub srv: Vec<(u16, Name)>,
    /// Answered to clients outside the recursion networks too (routed host names, public
    /// anyway); service and task names are not.
    pub public: bool,
}

/// Every local name, lower-case, each both bare (`web`) and under the cluster domain
/// (`web.mesh.internal.`), with its records built once when the zone is built (a query only
/// picks references to them).
#[derive(Clone, Debug)]
pub struct Zone {
    domain: LowerName,
    records: HashMap<LowerName, Records>,
    soa: Record,
}

#[derive(Clone, Debug, Default)]
struct Records {
    a: Vec<Record>,
    aaaa: Vec<Record>,
    srv: Vec<Record>,
    public: bool,
}

/// A problem with a name given to the zone builder.
#[derive(Debug, thiserror::Error)]
#[error("`{name}` is not a valid DNS name: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: String,
}

fn parse_name(name: &str) -> Result<Name, NameError> {
    let fqdn = if name.ends_with('.') { name.to_owned() } else { format!("{name}.") };
    Name::from_str(&fqdn).map_err(|e| NameError { name: name.to_owned(), reason: e.to_string() })
}

/// Collects names, then [`ZoneBuilder::build`]s an immutable [`Zone`].
#[derive(Debug)]
pub struct ZoneBuilder {
    domain: Name,
    ttl: u32,
    entries: HashMap<LowerName, Entry>,
}

impl ZoneBuilder {
    /// `domain` is the cluster domain (e.g. `mesh.internal`), `ttl` the TTL of every answer.
    pub fn new(domain: &str, ttl: u32) -> Result<Self, NameError> {
        Ok(Self { domain: parse_name(domain)?, ttl, entries: HashMap::new() })
    }

    fn entry(&mut self, name: &str) -> Result<Vec<&mut Entry>, NameError> {
        let bare = parse_name(name)?;
        let mut keys = vec![LowerName::from(&bare)];
        if !self.domain.zone_of(&bare) {
            let qualified = bare
                .clone()
                .append_domain(&self.domain)
                .map_err(|e| NameError { name: name.to_owned(), reason: e.to_string() })?;
            keys.push(LowerName::from(&qualified));
        }
        for key in &keys {
            self.entries.entry(key.clone()).or_default();
        }
        Ok(self.entries.iter_mut().filter(|(k, _)| keys.contains(k)).map(|(_, e)| e).collect())
    }

    /// Adds addresses to `name` (and `name.<domain>`).
    pub fn add(&mut self, name: &str, addrs: &[IpAddr]) -> Result<&mut Self, NameError> {
        for entry in self.entry(name)? {
            for addr in addrs {
                match *addr {
                    IpAddr::V4(v4) if !entry.v4.contains(&v4) => entry.v4.push(v4),
                    IpAddr::V6(v6) if !entry.v6.contains(&v6) => entry.v6.push(v6),
                    _ => {}
                }
            }
        }
        Ok(self)
    }

    /// Adds addresses to `name` (and `name.<domain>`) that anyone may ask for.
    pub fn add_public(&mut self, name: &str, addrs: &[IpAddr]) -> Result<&mut Self, NameError> {
        self.add(name, addrs)?;
        for entry in self.entry(name)? {
            entry.public = true;
        }
        Ok(self)
    }

    /// Adds an SRV record `name` -> `target:port`.
    pub fn add_srv(&mut self, name: &str, port: u16, target: &str) -> Result<&mut Self, NameError> {
        let target = parse_name(target)?;
        let target = if self.domain.zone_of(&target) {
            target
        } else {
            target
                .append_domain(&self.domain)
                .map_err(|e| NameError { name: name.to_owned(), reason: e.to_string() })?
        };
        for entry in self.entry(name)? {
            entry.srv.push((port, target.clone()));
        }
        Ok(self)
    }

    #[must_use]
    pub fn build(self) -> Zone {
        let ns = Name::from_str("ns").expect("valid").append_domain(&self.domain).expect("short name");
        let admin =
            Name::from_str("hostmaster").expect("valid").append_domain(&self.domain).expect("short name");
        // The SOA minimum is the negative-caching TTL (RFC 2308): keep it as short as the answers.
        let soa = SOA::new(ns, admin, 1, 60, 30, 3600, self.ttl);
        let ttl = self.ttl;
        let records = self
            .entries
            .into_iter()
            .map(|(name, entry)| {
                let owner = Name::from(&name);
                let rec = |rdata| Record::from_rdata(owner.clone(), ttl, rdata);
                let records = Records {
                    a: entry.v4.iter().map(|ip| rec(RData::A(A(*ip)))).collect(),
                    aaaa: entry.v6.iter().map(|ip| rec(RData::AAAA(AAAA(*ip)))).collect(),
                    srv: entry
                        .srv
                        .iter()
                        .map(|(port, target)| rec(RData::SRV(SRV::new(0, 10, *port, target.clone()))))
                        .collect(),
                    public: entry.public,
                };
                (name, records)
            })
            .collect();
        Zone {
            soa: Record::from_rdata(self.domain.clone(), ttl, RData::SOA(soa)),
            domain: LowerName::from(&self.domain),
            records,
        }
    }
}

/// References to `set` in a new random order.
fn shuffled(set: &[Record]) -> Vec<&Record> {
    let mut refs: Vec<&Record> = set.iter().collect();
    fastrand::shuffle(&mut refs);
    refs
}

/// What the zone says about a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// The name exists; these are its records of the asked type (maybe none: NODATA).
    Records(Vec<&'a Record>),
    /// The name is under the cluster domain and does not exist.
    NxDomain,
    /// Not ours: forward it.
    NotOurs,
}

impl Zone {
    /// An empty zone for `domain`.
    pub fn empty(domain: &str, ttl: u32) -> Result<Self, NameError> {
        Ok(ZoneBuilder::new(domain, ttl)?.build())
    }

    #[must_use]
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether `name` may be answered to clients outside the recursion networks.
    #[must_use]
    pub fn is_public(&self, name: &LowerName) -> bool {
        self.records.get(name).is_some_and(|r| r.public)
    }

    /// Answers `name`/`qtype`. Addresses come in a new random order on every call, as
    /// Docker's `dnsrr` does, so clients spread over the tasks.
    #[must_use]
    pub fn answer(&self, name: &LowerName, qtype: RecordType) -> Answer<'_> {
        let Some(records) = self.records.get(name) else {
            // The apex exists (names exist below it): its SOA, or no data of other types.
            if name == &self.domain {
                return Answer::Records(if qtype == RecordType::SOA { vec![&self.soa] } else { Vec::new() });
            }
            return if self.domain.zone_of(name) { Answer::NxDomain } else { Answer::NotOurs };
        };
        let mut out = match qtype {
            RecordType::A => shuffled(&records.a),
            RecordType::AAAA => shuffled(&records.aaaa),
            RecordType::SRV => records.srv.iter().collect(),
            RecordType::ANY => {
                let mut all = shuffled(&records.a);
                all.extend(shuffled(&records.aaaa));
                all.extend(records.srv.iter());
                all
            }
            _ => Vec::new(),
        };
        if qtype == RecordType::SOA && name == &self.domain {
            out.push(&self.soa);
        }
        Answer::Records(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(n: &str) -> LowerName {
        LowerName::from(Name::from_str(n).unwrap())
    }

    #[test]
    fn names_bare_and_qualified_case_insensitive() {
        let mut b = ZoneBuilder::new("mesh.internal", 5).unwrap();
        b.add("Web", &["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "fd00::1".parse().unwrap()])
            .unwrap();
        let zone = b.build();
        for name in ["web.", "WEB.mesh.internal.", "web.MESH.internal."] {
            let Answer::Records(a) = zone.answer(&lower(name), RecordType::A) else { panic!("{name}") };
            assert_eq!(a.len(), 2, "{name}");
            assert_eq!(a[0].ttl, 5);
        }
        let Answer::Records(aaaa) = zone.answer(&lower("web."), RecordType::AAAA) else { panic!() };
        assert_eq!(aaaa.len(), 1);
        assert_eq!(zone.answer(&lower("web."), RecordType::MX), Answer::Records(vec![]), "NODATA");
        assert_eq!(zone.answer(&lower("db.mesh.internal."), RecordType::A), Answer::NxDomain);
        assert_eq!(zone.answer(&lower("example.com."), RecordType::A), Answer::NotOurs);
        assert!(!zone.is_public(&lower("web.")), "service names stay inside");
    }

    #[test]
    fn routed_hosts_are_public() {
        let mut b = ZoneBuilder::new("mesh.internal", 5).unwrap();
        b.add_public("shop.example.com", &["192.0.2.1".parse().unwrap()]).unwrap();
        let zone = b.build();
        assert!(zone.is_public(&lower("shop.example.com.")));
        assert!(!zone.is_public(&lower("other.example.com.")));
    }

    #[test]
    fn srv_targets_are_qualified() {
        let mut b = ZoneBuilder::new("mesh.internal", 5).unwrap();
        b.add_srv("_8080._tcp.web", 8080, "web").unwrap();
        let zone = b.build();
        let Answer::Records(srv) = zone.answer(&lower("_8080._tcp.web.mesh.internal."), RecordType::SRV)
        else {
            panic!()
        };
        let RData::SRV(s) = &srv[0].data else { panic!() };
        assert_eq!((s.port, s.target.to_string()), (8080, "web.mesh.internal.".to_owned()));
    }
}
