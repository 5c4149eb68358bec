//! nginx-proxy's htpasswd directory (`/etc/nginx/htpasswd/<VIRTUAL_HOST>`): a file named
//! after a host holds the users who may reach it, lines as `htpasswd` writes them; for a
//! `VIRTUAL_PATH`, `<host>_<sha1 of the path>` first; for a regex host, the sha1 of the
//! `VIRTUAL_HOST` value (`~` included). Realms as nginx-proxy's. Read at every resync, so a
//! file added, changed or removed takes effect within one. A file that exists but cannot be
//! used refuses its host (never served open).

use std::fmt::Write as _;
use std::path::Path;

use crate::state::{BasicAuth, HostPattern, HttpRoute};

/// What the directory says of one host.
#[derive(Clone, PartialEq, Eq)]
enum Says {
    Nothing,
    Users(BasicAuth),
    Broken(String),
}

fn read(dir: &Path, file: &str, realm: String) -> Says {
    match BasicAuth::from_htpasswd_file(&dir.join(file)) {
        Ok(None) => Says::Nothing,
        Ok(Some(auth)) => Says::Users(BasicAuth { realm, ..auth }),
        Err(why) => Says::Broken(why),
    }
}

fn sha1_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
    digest.as_ref().iter().fold(String::with_capacity(40), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// What the directory says of `host` on a route with `path`.
fn says(dir: &Path, host: &HostPattern, path: &str) -> Says {
    match host {
        HostPattern::Exact(name) => {
            if path != "/" {
                let file = format!("{name}_{}", sha1_hex(path));
                let by_path = read(dir, &file, format!("Restricted {name}{path}"));
                if by_path != Says::Nothing {
                    return by_path;
                }
            }
            read(dir, name, format!("Restricted {name}"))
        }
        HostPattern::Regex(re) => read(dir, &sha1_hex(&format!("~{re}")), "Restricted access".into()),
        _ => Says::Nothing,
    }
}

/// Gives the routes without a basic auth of their own the users of their hosts' files; a
/// route whose hosts have different files is split, one route per file.
pub fn apply(routes: Vec<HttpRoute>, dir: &Path) -> Vec<HttpRoute> {
    let mut out = Vec::with_capacity(routes.len());
    for route in routes {
        if route.basic_auth.is_some() {
            out.push(route);
            continue;
        }
        let mut groups: Vec<(Says, Vec<HostPattern>)> = Vec::new();
        for host in &route.hosts {
            let says = says(dir, host, &route.path);
            match groups.iter_mut().find(|(s, _)| *s == says) {
                Some((_, hosts)) => hosts.push(host.clone()),
                None => groups.push((says, vec![host.clone()])),
            }
        }
        for (says, hosts) in groups {
            let mut part = HttpRoute { hosts, ..route.clone() };
            match says {
                Says::Nothing => {}
                Says::Users(auth) => part.basic_auth = Some(auth),
                Says::Broken(why) => {
                    part.refused
                        .get_or_insert(format!("{why}; the host is not served rather than served open"));
                }
            }
            out.push(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(hosts: &[&str]) -> HttpRoute {
        HttpRoute::new(hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect(), "/".into(), 80)
    }

    #[test]
    fn each_host_gets_its_files_users_and_a_broken_file_refuses_its_host() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.test"), "ann:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n").unwrap();
        std::fs::write(dir.path().join("b.test"), "bob:cleartext\n").unwrap();
        let out = apply(vec![route(&["a.test", "b.test", "c.test"])], dir.path());
        assert_eq!(out.len(), 3, "one route per file: {out:?}");
        let of = |h: &str| out.iter().find(|r| r.hosts.iter().any(|p| p.to_string() == h)).unwrap();
        assert_eq!(of("a.test").basic_auth.as_ref().unwrap().users.len(), 1);
        assert!(of("a.test").refused.is_none());
        assert!(of("b.test").refused.as_deref().is_some_and(|w| w.contains("b.test")), "{:?}", of("b.test"));
        assert!(of("c.test").basic_auth.is_none() && of("c.test").refused.is_none());
        // Hosts alike stay one route.
        assert_eq!(apply(vec![route(&["c.test", "d.test"])], dir.path()).len(), 1);
    }
}
