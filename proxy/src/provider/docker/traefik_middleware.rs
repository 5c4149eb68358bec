//! A Traefik router's `middlewares`, read from the labels of the same container or service
//! into the route's chain ([`Middleware`]), in the router's order.
//!
//! Fails closed: a middleware, or one option of it, that meshgate does not honour is an
//! `Err` saying which and why, and the route is then refused (never served without it).
//! Option names are read case-insensitively, as Traefik does (`stripPrefix.prefixes` and
//! `stripprefix.prefixes` are one option).
//!
//! A router may name a middleware defined on another container or service (Authelia's
//! container defines `authelia`, the applications say `authelia@docker`): every workload's
//! definitions are in one [`Catalogue`] per resync. `@docker` and `@swarm` both name it.

use std::collections::{BTreeMap, HashMap};

use crate::state::{BasicAuth, Cors, ForwardAuth, Headers, Middleware, Source};

/// Options meshgate reads, by middleware kind (lower case; `*` ends a prefix whose rest is
/// a name, such as a header's).
const KNOWN: &[(&str, &[&str])] = &[
    ("basicauth", &["users", "usersfile", "realm", "removeheader", "headerfield"]),
    ("ipallowlist", &["sourcerange"]),
    ("ipwhitelist", &["sourcerange"]),
    ("redirectscheme", &["scheme", "port", "permanent"]),
    ("redirectregex", &["regex", "replacement", "permanent"]),
    ("stripprefix", &["prefixes", "forceslash"]),
    ("stripprefixregex", &["regex"]),
    ("addprefix", &["prefix"]),
    ("replacepath", &["path"]),
    ("replacepathregex", &["regex", "replacement"]),
    (
        "headers",
        &[
            "customrequestheaders.*",
            "customresponseheaders.*",
            "stsseconds",
            "stsincludesubdomains",
            "stspreload",
            "forcestsheader",
            "framedeny",
            "customframeoptionsvalue",
            "contenttypenosniff",
            "browserxssfilter",
            "custombrowserxssvalue",
            "contentsecuritypolicy",
            "contentsecuritypolicyreportonly",
            "referrerpolicy",
            "permissionspolicy",
            "featurepolicy",
            "accesscontrolalloworiginlist",
            "accesscontrolalloworiginlistregex",
            "accesscontrolallowmethods",
            "accesscontrolallowheaders",
            "accesscontrolexposeheaders",
            "accesscontrolallowcredentials",
            "accesscontrolmaxage",
            "addvaryheader",
        ],
    ),
    (
        "ratelimit",
        &["average", "period", "burst", "sourcecriterion.requesthost", "sourcecriterion.requestheadername"],
    ),
    ("inflightreq", &["amount", "sourcecriterion.requesthost", "sourcecriterion.requestheadername"]),
    ("chain", &["middlewares"]),
    ("retry", &["attempts", "initialinterval"]),
    (
        "compress",
        &[
            "excludedcontenttypes",
            "includedcontenttypes",
            "minresponsebodybytes",
            "encodings",
            "defaultencoding",
        ],
    ),
    // Memory sizes are tuning (meshgate streams bodies): read, nothing to honour.
    ("buffering", &["maxrequestbodybytes", "memrequestbodybytes", "memresponsebodybytes"]),
    (
        "forwardauth",
        &[
            "address",
            "trustforwardheader",
            "authresponseheaders",
            "authrequestheaders",
            "addauthcookiestoresponse",
        ],
    ),
];

/// The middlewares every container and service of the engine defines, by name. A name
/// defined differently by two of them is kept as a conflict (a router using it is refused,
/// as Traefik drops it).
#[derive(Debug, Default)]
pub struct Catalogue(HashMap<String, Result<Definition, String>>);

/// Who defines a middleware, and its labels.
type Definition = (String, HashMap<String, String>);

impl Catalogue {
    /// Adds the definitions in `owner`'s labels.
    pub fn add(&mut self, owner: &str, labels: &HashMap<String, String>) {
        let mut mine = BTreeMap::<&str, HashMap<String, String>>::new();
        for (key, value) in labels {
            if let Some(name) =
                key.strip_prefix("traefik.http.middlewares.").and_then(|r| r.split('.').next())
            {
                mine.entry(name).or_default().insert(key.clone(), value.clone());
            }
        }
        for (name, def) in mine {
            match self.0.get(name) {
                Some(Ok((first, known))) if *known != def => {
                    let why =
                        format!("middleware `{name}` is defined differently on `{first}` and `{owner}`");
                    self.0.insert(name.to_owned(), Err(why));
                }
                Some(_) => {}
                None => {
                    self.0.insert(name.to_owned(), Ok((owner.to_owned(), def)));
                }
            }
        }
    }
}

/// Whether meshgate reads `option` (lower case) of a middleware of `kind` (lower case).
#[must_use]
pub fn known(kind: &str, option: &str) -> bool {
    // `traefik.http.middlewares.<m>.compress=true`: the kind alone, with its defaults.
    if option.is_empty() {
        return KNOWN.iter().any(|(k, _)| *k == kind);
    }
    KNOWN.iter().filter(|(k, _)| *k == kind).flat_map(|(_, opts)| opts.iter()).any(|o| {
        match o.strip_suffix('*') {
            Some(prefix) => option.starts_with(prefix) && option.len() > prefix.len(),
            None => *o == option,
        }
    })
}

/// The chain a router's `middlewares` value names, from the `traefik.http.middlewares.*`
/// labels of the same workload (`name`, `name@docker`, `name@swarm`).
///
/// # Errors
/// Why the chain cannot be honoured as written (the route is then refused).
pub fn chain(
    labels: &HashMap<String, String>,
    catalogue: &Catalogue,
    names: &str,
) -> Result<Vec<Middleware>, String> {
    let mut out = Vec::new();
    expand((labels, catalogue), names, &mut Vec::new(), &mut out)?;
    if out.iter().filter(|m| matches!(m, Middleware::BasicAuth(_))).count() > 1 {
        return Err("two basicauth middlewares on one router".into());
    }
    Ok(out)
}

fn expand(
    labels: (&HashMap<String, String>, &Catalogue),
    names: &str,
    seen: &mut Vec<String>,
    out: &mut Vec<Middleware>,
) -> Result<(), String> {
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let local = name.strip_suffix("@docker").or_else(|| name.strip_suffix("@swarm")).unwrap_or(name);
        if local.contains('@') {
            return Err(format!(
                "middleware `{name}` comes from another provider, which meshgate does not read"
            ));
        }
        if seen.iter().any(|s| s == local) {
            return Err(format!("middleware `{local}` is part of itself (a chain loop)"));
        }
        let (kind, options) = definition(labels, local)?;
        if kind == "chain" {
            seen.push(local.to_owned());
            expand(labels, options.get("middlewares").copied().unwrap_or(""), seen, out)?;
            seen.pop();
            continue;
        }
        out.push(one(local, &kind, &options).map_err(|e| format!("middleware `{local}` ({kind}): {e}"))?);
    }
    Ok(())
}

/// A middleware's kind and options (lower-case option names), from the workload's own
/// labels, else from the one that defines it.
fn definition<'a>(
    (own, catalogue): (&'a HashMap<String, String>, &'a Catalogue),
    name: &str,
) -> Result<(String, BTreeMap<String, &'a str>), String> {
    let prefix = format!("traefik.http.middlewares.{name}.");
    let labels = if own.keys().any(|k| k.starts_with(&prefix)) {
        own
    } else {
        match catalogue.0.get(name) {
            Some(Ok((_, labels))) => labels,
            Some(Err(conflict)) => return Err(conflict.clone()),
            None => own,
        }
    };
    let mut kinds = BTreeMap::<String, BTreeMap<String, &str>>::new();
    for (key, value) in labels {
        let Some(rest) = key.strip_prefix(&prefix) else { continue };
        let rest = rest.to_ascii_lowercase();
        let (kind, option) = rest.split_once('.').unwrap_or((rest.as_str(), ""));
        kinds.entry(kind.to_owned()).or_default().insert(option.to_owned(), value.as_str());
    }
    let mut kinds = kinds.into_iter();
    match (kinds.next(), kinds.next()) {
        (None, _) => Err(format!("middleware `{name}` is not defined on any container or service")),
        (Some((a, _)), Some((b, _))) => {
            Err(format!("middleware `{name}` is defined as two kinds ({a}, {b})"))
        }
        (Some((kind, options)), None) => {
            if !KNOWN.iter().any(|(k, _)| *k == kind) {
                return Err(format!("middleware `{name}` ({kind}) is not honoured yet"));
            }
            if let Some(other) = options.keys().find(|o| !known(&kind, o)) {
                return Err(format!("`{prefix}{kind}.{other}` is not honoured yet"));
            }
            Ok((kind, options))
        }
    }
}

fn flag(options: &BTreeMap<String, &str>, key: &str) -> Result<bool, String> {
    match options.get(key) {
        None => Ok(false),
        Some(v) => super::optin::parse_bool(v).ok_or_else(|| format!("`{key}={v}` is not true or false")),
    }
}

fn number(options: &BTreeMap<String, &str>, key: &str) -> Result<Option<u64>, String> {
    options
        .get(key)
        .map(|v| v.trim().parse::<u64>().map_err(|_| format!("`{key}={v}` is not a whole number")))
        .transpose()
}

fn list(options: &BTreeMap<String, &str>, key: &str) -> Vec<String> {
    options
        .get(key)
        .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn required<'a>(options: &BTreeMap<String, &'a str>, key: &str) -> Result<&'a str, String> {
    options.get(key).copied().filter(|v| !v.trim().is_empty()).ok_or_else(|| format!("`{key}` is missing"))
}

fn regex(pattern: &str) -> Result<String, String> {
    regex::Regex::new(pattern)
        .map(|_| pattern.to_owned())
        .map_err(|e| format!("`{pattern}` is not a regular expression: {e}"))
}

/// A Go duration as Traefik's `period` takes it (`1s`, `1m`, `500ms`; a bare number is
/// seconds).
fn period(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => {
            humantime::parse_duration(v).map_err(|_| format!("`period={v}` is not a duration (1s, 1m)"))?
        }
    };
    u64::try_from(d.as_millis())
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("`period={v}` must be more than 0"))
}

/// What a limit counts by; without a `sourceCriterion`, Traefik's default for the kind (the
/// client's address for `ratelimit`, the requested host for `inflightreq`).
fn source(options: &BTreeMap<String, &str>, default: Source) -> Result<Source, String> {
    if let Some(name) = options.get("sourcecriterion.requestheadername").filter(|v| !v.trim().is_empty()) {
        return Ok(Source::Header(name.trim().to_ascii_lowercase()));
    }
    Ok(if flag(options, "sourcecriterion.requesthost")? { Source::Host } else { default })
}

fn header_name(name: &str) -> Result<String, String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|n| n.as_str().to_owned())
        .map_err(|_| format!("`{name}` is not a header name"))
}

/// A `basicauth` middleware: inline users, and those of its `usersfile`.
fn basic_auth(o: &BTreeMap<String, &str>) -> Result<BasicAuth, String> {
    let mut users = list(o, "users");
    // Read here, on the node that watches Docker; the users travel with the route
    // to every node (which need not have the file).
    if let Some(file) = o.get("usersfile") {
        match BasicAuth::from_htpasswd_file(std::path::Path::new(file.trim()))? {
            Some(from_file) => users.extend(from_file.users),
            None => return Err(format!("`basicauth.usersfile` {file} does not exist on this node")),
        }
    }
    let header_field = o.get("headerfield").map(|h| header_name(h.trim())).transpose()?;
    let auth = BasicAuth {
        users,
        realm: o.get("realm").map_or("traefik", |r| r).to_owned(),
        remove_header: flag(o, "removeheader")?,
        header_field,
    };
    if auth.users.is_empty() {
        return Err("no user in `basicauth.users` or `basicauth.usersfile`".into());
    }
    if let Some(bad) = auth.bad_entry() {
        return Err(bad);
    }
    Ok(auth)
}

fn one(name: &str, kind: &str, o: &BTreeMap<String, &str>) -> Result<Middleware, String> {
    Ok(match kind {
        "basicauth" => Middleware::BasicAuth(basic_auth(o)?),
        "ipallowlist" | "ipwhitelist" => {
            let networks = list(o, "sourcerange")
                .iter()
                .map(|n| crate::state::parse_network(n))
                .collect::<Result<Vec<_>, _>>()?;
            if networks.is_empty() {
                return Err("allows no network".into());
            }
            Middleware::AllowFrom { networks }
        }
        "redirectscheme" => {
            let scheme = required(o, "scheme")?.trim().to_ascii_lowercase();
            if scheme != "http" && scheme != "https" {
                return Err(format!("scheme `{scheme}` is neither http nor https"));
            }
            let port = o
                .get("port")
                .map(|p| p.trim().parse::<u16>().map_err(|_| format!("port `{p}` is not a port")))
                .transpose()?;
            Middleware::RedirectScheme { scheme, port, permanent: flag(o, "permanent")? }
        }
        "redirectregex" => Middleware::RedirectRegex {
            regex: regex(required(o, "regex")?)?,
            replacement: required(o, "replacement")?.to_owned(),
            permanent: flag(o, "permanent")?,
        },
        "stripprefix" => {
            let prefixes = list(o, "prefixes");
            if prefixes.is_empty() {
                return Err("no `prefixes`".into());
            }
            Middleware::StripPrefix { prefixes }
        }
        "stripprefixregex" => {
            let regexes = list(o, "regex").iter().map(|r| regex(r)).collect::<Result<Vec<_>, _>>()?;
            if regexes.is_empty() {
                return Err("no `regex`".into());
            }
            Middleware::StripPrefixRegex { regexes }
        }
        "addprefix" => Middleware::AddPrefix { prefix: required(o, "prefix")?.trim().to_owned() },
        "replacepath" => Middleware::ReplacePath { path: required(o, "path")?.trim().to_owned() },
        "replacepathregex" => Middleware::ReplacePathRegex {
            regex: regex(required(o, "regex")?)?,
            replacement: o.get("replacement").copied().unwrap_or("").to_owned(),
        },
        "headers" => Middleware::Headers(headers(o)?),
        "ratelimit" | "inflightreq" | "retry" | "buffering" => limit(kind, o)?,
        "compress" => {
            // gzip is what meshgate writes: a list without it cannot be honoured.
            let encodings = list(o, "encodings");
            if !encodings.is_empty() && !encodings.iter().any(|e| e.eq_ignore_ascii_case("gzip")) {
                return Err(format!(
                    "`encodings` ({}) has no gzip, the one meshgate writes",
                    encodings.join(",")
                ));
            }
            if let Some(d) = o.get("defaultencoding").filter(|d| !d.trim().eq_ignore_ascii_case("gzip")) {
                return Err(format!("`defaultEncoding={d}`: meshgate writes gzip only"));
            }
            Middleware::Compress {
                min_bytes: number(o, "minresponsebodybytes")?.unwrap_or(1024),
                excluded: list(o, "excludedcontenttypes"),
                included: list(o, "includedcontenttypes"),
            }
        }
        "forwardauth" => {
            let address = required(o, "address")?.trim().to_owned();
            if !address.starts_with("http://") || address.parse::<hyper::Uri>().is_err() {
                return Err(format!("address `{address}` is not an http:// URL (https to the authentication server is not honoured yet)"));
            }
            Middleware::ForwardAuth(ForwardAuth {
                address,
                trust_forward_header: flag(o, "trustforwardheader")?,
                response_headers: list(o, "authresponseheaders"),
                request_headers: list(o, "authrequestheaders"),
                add_cookies_to_response: list(o, "addauthcookiestoresponse"),
            })
        }
        other => return Err(format!("middleware `{name}` ({other}) is not honoured yet")),
    })
}

/// The middlewares that limit: how fast, how many at once, how many tries, how large.
fn limit(kind: &str, o: &BTreeMap<String, &str>) -> Result<Middleware, String> {
    Ok(match kind {
        "ratelimit" => {
            let average = number(o, "average")?.unwrap_or(0);
            if average == 0 {
                // Traefik: an average of 0 is no limit at all, so nothing to honour.
                return Err(
                    "`average` is 0 or missing, which limits nothing: remove the middleware or give a rate"
                        .into(),
                );
            }
            Middleware::RateLimit {
                average,
                period_ms: o.get("period").map_or(Ok(1000), |p| period(p))?,
                burst: number(o, "burst")?.unwrap_or(1).max(1),
                source: source(o, Source::ClientIp)?,
            }
        }
        "inflightreq" => {
            let amount = number(o, "amount")?.filter(|a| *a > 0).ok_or("`amount` is missing or 0")?;
            Middleware::InFlight { amount, source: source(o, Source::Host)? }
        }
        "retry" => {
            let attempts = number(o, "attempts")?.filter(|a| *a > 0).ok_or("`attempts` is missing or 0")?;
            let interval = match o.get("initialinterval") {
                None => 0,
                Some(v) => period(v).map_err(|e| e.replace("period", "initialInterval"))?,
            };
            Middleware::Retry {
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                initial_interval_ms: interval,
            }
        }
        "buffering" => {
            Middleware::Buffering { max_request_body: number(o, "maxrequestbodybytes")?.filter(|n| *n > 0) }
        }
        _ => Middleware::Buffering { max_request_body: number(o, "maxrequestbodybytes")?.filter(|n| *n > 0) },
    })
}

/// Traefik's `headers` options as meshgate's [`Headers`]: the security options become the
/// response headers they stand for.
fn headers(o: &BTreeMap<String, &str>) -> Result<Headers, String> {
    let mut h = Headers::default();
    for (key, value) in o {
        if let Some(name) = key.strip_prefix("customrequestheaders.") {
            h.request.push((header_name(name)?, (*value).to_owned()));
        } else if let Some(name) = key.strip_prefix("customresponseheaders.") {
            h.response.push((header_name(name)?, (*value).to_owned()));
        }
    }
    let mut set = |name: &str, value: String| h.response.push((name.to_owned(), value));
    if let Some(v) = o.get("customframeoptionsvalue") {
        set("x-frame-options", (*v).to_owned());
    } else if flag(o, "framedeny")? {
        set("x-frame-options", "DENY".into());
    }
    if flag(o, "contenttypenosniff")? {
        set("x-content-type-options", "nosniff".into());
    }
    if let Some(v) = o.get("custombrowserxssvalue") {
        set("x-xss-protection", (*v).to_owned());
    } else if flag(o, "browserxssfilter")? {
        set("x-xss-protection", "1; mode=block".into());
    }
    for (option, name) in [
        ("referrerpolicy", "referrer-policy"),
        ("permissionspolicy", "permissions-policy"),
        ("featurepolicy", "feature-policy"),
    ] {
        if let Some(v) = o.get(option) {
            set(name, (*v).to_owned());
        }
    }
    if let Some(v) = o.get("contentsecuritypolicy") {
        set("content-security-policy", (*v).to_owned());
    }
    if let Some(v) = o.get("contentsecuritypolicyreportonly") {
        set("content-security-policy-report-only", (*v).to_owned());
    }
    for (_, value) in h.request.iter().chain(&h.response) {
        http::HeaderValue::from_str(value).map_err(|_| format!("`{value}` is not a header value"))?;
    }
    if let Some(secs) = number(o, "stsseconds")?.filter(|s| *s > 0) {
        let mut sts = format!("max-age={secs}");
        if flag(o, "stsincludesubdomains")? {
            sts.push_str("; includeSubDomains");
        }
        if flag(o, "stspreload")? {
            sts.push_str("; preload");
        }
        h.sts = Some(sts);
        h.sts_always = flag(o, "forcestsheader")?;
    }
    let origins = list(o, "accesscontrolalloworiginlist");
    let origin_regexes = list(o, "accesscontrolalloworiginlistregex")
        .iter()
        .map(|r| regex(r))
        .collect::<Result<Vec<_>, _>>()?;
    let cors_options = o.keys().any(|k| k.starts_with("accesscontrol"));
    if cors_options {
        if origins.is_empty() && origin_regexes.is_empty() {
            return Err(
                "CORS options without `accessControlAllowOriginList`: no origin would be allowed".into()
            );
        }
        h.cors = Some(Cors {
            allow_origins: origins,
            allow_origin_regexes: origin_regexes,
            allow_methods: list(o, "accesscontrolallowmethods"),
            allow_headers: list(o, "accesscontrolallowheaders"),
            expose_headers: list(o, "accesscontrolexposeheaders"),
            allow_credentials: flag(o, "accesscontrolallowcredentials")?,
            max_age: number(o, "accesscontrolmaxage")?,
            add_vary: flag(o, "addvaryheader")?,
        });
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_chain_keeps_the_routers_order_and_expands_chains() {
        let l = labels(&[
            ("traefik.http.middlewares.https.redirectScheme.scheme", "https"),
            ("traefik.http.middlewares.https.redirectScheme.permanent", "true"),
            ("traefik.http.middlewares.strip.stripPrefix.prefixes", "/api,/v1"),
            ("traefik.http.middlewares.sec.headers.frameDeny", "true"),
            ("traefik.http.middlewares.sec.headers.customRequestHeaders.X-Script-Name", "test"),
            ("traefik.http.middlewares.sec.headers.stsSeconds", "31536000"),
            ("traefik.http.middlewares.both.chain.middlewares", "strip,sec"),
        ]);
        let c = chain(&l, &Catalogue::default(), "https@docker, both").unwrap();
        assert!(
            matches!(&c[0], Middleware::RedirectScheme { scheme, permanent: true, port: None } if scheme == "https")
        );
        assert!(matches!(&c[1], Middleware::StripPrefix { prefixes } if prefixes == &["/api", "/v1"]));
        let Middleware::Headers(h) = &c[2] else { panic!("{c:?}") };
        assert_eq!(h.request, vec![("x-script-name".to_owned(), "test".to_owned())]);
        assert_eq!(h.response, vec![("x-frame-options".to_owned(), "DENY".to_owned())]);
        assert_eq!(h.sts.as_deref(), Some("max-age=31536000"));
    }

    #[test]
    fn what_is_not_honoured_is_an_error_never_dropped() {
        for (pairs, chain_value, why) in [
            (vec![("traefik.http.middlewares.z.errors.status", "500-599")], "z", "not honoured"),
            (vec![("traefik.http.middlewares.z.compress.encodings", "zstd,br")], "z", "no gzip"),
            (vec![("traefik.http.middlewares.h.headers.allowedHosts", "a.test")], "h", "allowedhosts"),
            (
                vec![("traefik.http.middlewares.r.ratelimit.sourcecriterion.ipstrategy.depth", "1")],
                "r",
                "ipstrategy",
            ),
            (vec![("traefik.http.middlewares.a.chain.middlewares", "a")], "a", "loop"),
            (vec![("traefik.http.middlewares.s.stripprefixregex.regex", "(")], "s", "regular expression"),
            (vec![("traefik.http.middlewares.f.forwardauth.address", "https://auth")], "f", "http://"),
            (vec![("traefik.http.middlewares.c.headers.accessControlAllowMethods", "GET")], "c", "origin"),
            (vec![], "missing", "not defined on any"),
            (vec![], "x@file", "another provider"),
        ] {
            let e = chain(&labels(&pairs), &Catalogue::default(), chain_value).unwrap_err();
            assert!(e.to_lowercase().contains(why), "{chain_value}: {e}");
        }
    }

    #[test]
    fn a_middleware_defined_on_another_workload_is_found_unless_two_define_it_differently() {
        let authelia = labels(&[(
            "traefik.http.middlewares.authelia.forwardauth.address",
            "http://127.0.0.1:9091/api/verify",
        )]);
        let mut catalogue = Catalogue::default();
        catalogue.add("authelia", &authelia);
        catalogue.add("copy", &authelia);
        let c = chain(&HashMap::new(), &catalogue, "authelia@docker").unwrap();
        assert!(matches!(&c[..], [Middleware::ForwardAuth(f)] if f.address.ends_with("/api/verify")));
        catalogue.add(
            "other",
            &labels(&[("traefik.http.middlewares.authelia.forwardauth.address", "http://127.0.0.1:1/")]),
        );
        let e = chain(&HashMap::new(), &catalogue, "authelia@docker").unwrap_err();
        assert!(e.contains("defined differently on `authelia` and `other`"), "{e}");
    }

    #[test]
    fn retry_and_buffering_set_the_routes_limits() {
        let l = labels(&[
            ("traefik.http.middlewares.r.retry.attempts", "4"),
            ("traefik.http.middlewares.r.retry.initialInterval", "100ms"),
            ("traefik.http.middlewares.b.buffering.maxRequestBodyBytes", "2000000"),
            ("traefik.http.middlewares.b.buffering.memRequestBodyBytes", "1000"),
            ("traefik.http.middlewares.x.buffering.retryExpression", "IsNetworkError() && Attempts() < 2"),
        ]);
        assert_eq!(
            chain(&l, &Catalogue::default(), "r,b").unwrap(),
            vec![
                Middleware::Retry { attempts: 4, initial_interval_ms: 100 },
                Middleware::Buffering { max_request_body: Some(2_000_000) },
            ]
        );
        assert!(chain(&l, &Catalogue::default(), "x").unwrap_err().contains("retryexpression"));
    }

    #[test]
    fn limits_read_traefiks_defaults() {
        let l = labels(&[
            ("traefik.http.middlewares.rl.ratelimit.average", "100"),
            ("traefik.http.middlewares.rl.ratelimit.period", "1m"),
            ("traefik.http.middlewares.in.inflightreq.amount", "10"),
            ("traefik.http.middlewares.in.inflightreq.sourcecriterion.requestheadername", "X-User"),
            ("traefik.http.middlewares.host.inflightreq.amount", "3"),
        ]);
        assert_eq!(
            chain(&l, &Catalogue::default(), "rl,in,host").unwrap(),
            vec![
                Middleware::RateLimit { average: 100, period_ms: 60_000, burst: 1, source: Source::ClientIp },
                Middleware::InFlight { amount: 10, source: Source::Header("x-user".into()) },
                Middleware::InFlight { amount: 3, source: Source::Host },
            ]
        );
    }
}
