//! `_acme-challenge.<name>` TXT records for DNS-01 validation (RFC 8555, 8.4), published
//! while an order is in progress. They are answered to anyone, also outside the recursion
//! networks: a CA's resolver reaches them through the user's delegation (an NS record for
//! `_acme-challenge.example.com`, or a CNAME to a name under `challenge_zone`).

use std::collections::HashMap;
use std::str::FromStr;

use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{LowerName, Name, RData, Record};

/// The TXT records of the challenges in progress, built whole and swapped in whole.
#[derive(Clone, Debug, Default)]
pub struct ChallengeRecords {
    records: HashMap<LowerName, Vec<Record>>,
}

impl ChallengeRecords {
    /// `set`: record name (`_acme-challenge.example.com`) and its values. Each is answered
    /// under its own name and, when `zone` is given, also under `<name>.<zone>` (the target of
    /// a CNAME delegation). Names that are not valid DNS names are left out.
    #[must_use]
    pub fn new<'a>(
        set: impl IntoIterator<Item = (&'a String, &'a Vec<String>)>,
        zone: Option<&Name>,
        ttl: u32,
    ) -> Self {
        let mut records: HashMap<LowerName, Vec<Record>> = HashMap::new();
        for (name, values) in set {
            let fqdn = if name.ends_with('.') { name.clone() } else { format!("{name}.") };
            let Ok(owner) = Name::from_str(&fqdn) else {
                tracing::debug!(%name, "dns: challenge name left out: not a DNS name");
                continue;
            };
            let mut owners = vec![owner.clone()];
            if let Some(delegated) = zone.and_then(|z| owner.clone().append_domain(z).ok()) {
                owners.push(delegated);
            }
            for owner in owners {
                let entry = records.entry(LowerName::from(&owner)).or_default();
                for value in values {
                    let record =
                        Record::from_rdata(owner.clone(), ttl, RData::TXT(TXT::new(vec![value.clone()])));
                    if !entry.contains(&record) {
                        entry.push(record);
                    }
                }
            }
        }
        Self { records }
    }

    /// The TXT records of `name`, if a challenge for it is in progress.
    #[must_use]
    pub fn get(&self, name: &LowerName) -> Option<&[Record]> {
        self.records.get(name).map(Vec::as_slice)
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_under_its_name_and_the_delegated_one() {
        let set: std::collections::BTreeMap<String, Vec<String>> = [(
            "_acme-challenge.Example.com".to_owned(),
            vec!["one".to_owned(), "two".to_owned(), "one".to_owned()],
        )]
        .into();
        let zone = Name::from_str("acme.cluster.test.").unwrap();
        let records = ChallengeRecords::new(&set, Some(&zone), 1);
        let lower = |n: &str| LowerName::from(Name::from_str(n).unwrap());
        assert_eq!(records.get(&lower("_acme-challenge.example.com.")).map(<[_]>::len), Some(2));
        assert_eq!(
            records.get(&lower("_acme-challenge.example.com.acme.cluster.test.")).map(<[_]>::len),
            Some(2)
        );
        assert!(records.get(&lower("example.com.")).is_none());
    }
}
