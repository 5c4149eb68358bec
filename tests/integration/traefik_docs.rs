//! Drop-in issue, items 4 and 5: Traefik's documented label examples, each as its own case,
//! copied from the documentation page it cites (traefik/traefik, `docs/content/middlewares/http/`,
//! file @ commit), attached to a router of its own, and run as written against the real
//! engine: on containers (`docker run -l`, here) and on Swarm services' `deploy.labels` in the
//! three-engine lab (`swarm.rs`, [`stack`] and [`check_all`]). The task is meshgate's own
//! whoami (`--whoami-listen`), which answers with the request line and headers it got, so a
//! rewritten path or an added header is seen as the task saw it.
//!
//! An example meshgate does not honour is a case too: its route is not served (503) and the
//! problem names the label, never served without it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::docker::{whoami_image, Container};
use crate::harness::{curl, Mesh, WHOAMI};

/// One documented example.
pub(crate) struct Case {
    /// The documentation page and the commit it was read at.
    source: &'static str,
    /// The service (and host `<name>.docs.test`, unless the example names its own).
    name: &'static str,
    /// The labels as the page writes them (`$` single, as `docker run -l` takes them).
    documented: &'static [&'static str],
    /// What attaches the example to a router of its own (the page leaves the router out).
    router: &'static [&'static str],
    /// The host the router answers.
    host: &'static str,
    checks: &'static [Check],
}

/// A request (`path`, more curl arguments: `@BIG` is a 3 MB file) and what it gets.
pub(crate) struct Check {
    path: &'static str,
    curl: &'static [&'static str],
    /// The status; `"200|403"`: 200 from the loopback (an example that allows 127.0.0.1),
    /// 403 from anywhere else.
    status: &'static str,
    /// In the answer (head and body, lower case).
    has: &'static [&'static str],
    /// Not in it.
    lacks: &'static [&'static str],
    /// A problem in `/api/state` containing this (a refused example).
    problem: Option<&'static str>,
}

const fn get(path: &'static str, status: &'static str, has: &'static [&'static str]) -> Check {
    Check { path, curl: &[], status, has, lacks: &[], problem: None }
}

const USERS: &str = "traefik.http.middlewares.test-auth.basicauth.users=test:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/,test2:$apr1$d9hr9HBB$4HxwgUir3HP4EsggP/QNo0";

pub(crate) const CASES: &[Case] = &[
    Case {
        source: "addprefix.md @ 38ff477a",
        name: "addprefix",
        documented: &["traefik.http.middlewares.add-foo.addprefix.prefix=/foo"],
        router: &["traefik.http.routers.addprefix.middlewares=add-foo"],
        host: "addprefix.docs.test",
        checks: &[get("/bar", "200", &["get /foo/bar http/1.1"])],
    },
    Case {
        source: "basicauth.md @ d78b090a (users)",
        name: "basicauth",
        documented: &[USERS],
        router: &["traefik.http.routers.basicauth.middlewares=test-auth"],
        host: "basicauth.docs.test",
        checks: &[
            get("/", "401", &["www-authenticate: basic realm=\"traefik\""]),
            Check { curl: &["-u", "test:test"], ..get("/", "200", &["authorization: basic"]) },
            Check { curl: &["-u", "test2:test2"], ..get("/", "200", &[]) },
            Check { curl: &["-u", "test:wrong"], ..get("/", "401", &[]) },
        ],
    },
    Case {
        source: "basicauth.md @ d78b090a (realm, removeHeader)",
        name: "basicauth-realm",
        documented: &[
            USERS,
            "traefik.http.middlewares.test-auth.basicauth.realm=MyRealm",
            "traefik.http.middlewares.test-auth.basicauth.removeheader=true",
        ],
        router: &["traefik.http.routers.basicauth-realm.middlewares=test-auth"],
        host: "basicauth-realm.docs.test",
        checks: &[
            get("/", "401", &["www-authenticate: basic realm=\"myrealm\""]),
            Check { curl: &["-u", "test:test"], lacks: &["authorization:"], ..get("/", "200", &["get / http/1.1"]) },
        ],
    },
    Case {
        source: "basicauth.md @ d78b090a (headerField)",
        name: "basicauth-field",
        documented: &[USERS, "traefik.http.middlewares.test-auth.basicauth.headerField=X-WebAuth-User"],
        router: &["traefik.http.routers.basicauth-field.middlewares=test-auth"],
        host: "basicauth-field.docs.test",
        checks: &[Check {
            curl: &["-u", "test2:test2", "-H", "X-WebAuth-User: admin"],
            lacks: &["admin"],
            ..get("/", "200", &["x-webauth-user: test2"])
        }],
    },
    Case {
        source: "buffering.md @ 0c0ae837",
        name: "buffering",
        documented: &["traefik.http.middlewares.limit.buffering.maxRequestBodyBytes=2000000"],
        router: &["traefik.http.routers.buffering.middlewares=limit"],
        host: "buffering.docs.test",
        checks: &[
            Check { curl: &["--data-binary", "@BIG"], ..get("/", "413", &[]) },
            Check { curl: &["--data-binary", "small"], ..get("/", "200", &["received: 5 bytes"]) },
        ],
    },
    Case {
        source: "chain.md @ 0c36ea68",
        name: "chain",
        documented: &[
            "traefik.http.routers.router1.service=service1",
            "traefik.http.routers.router1.middlewares=secured",
            "traefik.http.routers.router1.rule=Host(`mydomain`)",
            "traefik.http.middlewares.secured.chain.middlewares=https-only,known-ips,auth-users",
            "traefik.http.middlewares.auth-users.basicauth.users=test:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/",
            "traefik.http.middlewares.https-only.redirectscheme.scheme=https",
            "traefik.http.middlewares.known-ips.ipallowlist.sourceRange=192.168.1.7,127.0.0.1/32",
            "traefik.http.services.service1.loadbalancer.server.port=80",
        ],
        router: &[],
        host: "mydomain",
        // The chain's first link answers plain HTTP.
        checks: &[get("/x", "302", &["location: https://mydomain/x"])],
    },
    Case {
        source: "compress.md @ 627827c0",
        name: "compress",
        documented: &["traefik.http.middlewares.test-compress.compress=true"],
        router: &["traefik.http.routers.compress.middlewares=test-compress"],
        host: "compress.docs.test",
        checks: &[
            Check { curl: &["-H", "Accept-Encoding: gzip"], ..get("/data?size=20000", "200", &["content-encoding: gzip"]) },
            Check { lacks: &["content-encoding"], ..get("/data?size=20000", "200", &[]) },
        ],
    },
    Case {
        source: "headers.md @ 0410c543 (adding headers to the request and the response)",
        name: "headers-add",
        documented: &[
            "traefik.http.middlewares.testHeader.headers.customrequestheaders.X-Script-Name=test",
            "traefik.http.middlewares.testHeader.headers.customresponseheaders.X-Custom-Response-Header=value",
        ],
        router: &["traefik.http.routers.headers-add.middlewares=testHeader"],
        host: "headers-add.docs.test",
        checks: &[get("/", "200", &["x-script-name: test", "x-custom-response-header: value"])],
    },
    Case {
        source: "headers.md @ 0410c543 (adding and removing headers)",
        name: "headers-remove",
        documented: &[
            "traefik.http.middlewares.testheader.headers.customrequestheaders.X-Script-Name=test",
            "traefik.http.middlewares.testheader.headers.customrequestheaders.X-Custom-Request-Header=",
            "traefik.http.middlewares.testheader.headers.customresponseheaders.X-Custom-Response-Header=",
        ],
        router: &["traefik.http.routers.headers-remove.middlewares=testheader"],
        host: "headers-remove.docs.test",
        checks: &[Check {
            curl: &["-H", "X-Custom-Request-Header: from-client"],
            lacks: &["from-client"],
            ..get("/", "200", &["x-script-name: test"])
        }],
    },
    Case {
        source: "headers.md @ 0410c543 (security headers)",
        name: "headers-security",
        documented: &[
            "traefik.http.middlewares.testHeader.headers.framedeny=true",
            "traefik.http.middlewares.testHeader.headers.browserxssfilter=true",
        ],
        router: &["traefik.http.routers.headers-security.middlewares=testHeader"],
        host: "headers-security.docs.test",
        checks: &[get("/", "200", &["x-frame-options: deny", "x-xss-protection: 1; mode=block"])],
    },
    Case {
        source: "headers.md @ 0410c543 (CORS headers)",
        name: "headers-cors",
        documented: &[
            "traefik.http.middlewares.testheader.headers.accesscontrolallowmethods=GET,OPTIONS,PUT",
            "traefik.http.middlewares.testheader.headers.accesscontrolalloworiginlist=https://foo.bar.org,https://example.org",
            "traefik.http.middlewares.testheader.headers.accesscontrolmaxage=100",
            "traefik.http.middlewares.testheader.headers.addvaryheader=true",
        ],
        router: &["traefik.http.routers.headers-cors.middlewares=testheader"],
        host: "headers-cors.docs.test",
        checks: &[
            Check {
                curl: &["-H", "Origin: https://example.org"],
                ..get("/", "200", &["access-control-allow-origin: https://example.org", "vary: origin"])
            },
            Check {
                curl: &["-X", "OPTIONS", "-H", "Origin: https://foo.bar.org", "-H", "Access-Control-Request-Method: PUT"],
                lacks: &["get / http/1.1", "options / http/1.1"],
                ..get("/", "200", &["access-control-allow-origin: https://foo.bar.org", "access-control-max-age: 100"])
            },
            Check {
                curl: &["-H", "Origin: https://evil.test"],
                lacks: &["access-control-allow-origin"],
                ..get("/", "200", &[])
            },
        ],
    },
    Case {
        source: "inflightreq.md @ 9ceebed9",
        name: "inflightreq",
        documented: &["traefik.http.middlewares.test-inflightreq.inflightreq.amount=10"],
        router: &["traefik.http.routers.inflightreq.middlewares=test-inflightreq"],
        host: "inflightreq.docs.test",
        checks: &[get("/", "200", &["get / http/1.1"])],
    },
    Case {
        source: "ipallowlist.md @ 15900ed8 (sourceRange)",
        name: "ipallowlist",
        documented: &["traefik.http.middlewares.test-ipallowlist.ipallowlist.sourcerange=127.0.0.1/32, 192.168.1.7"],
        router: &["traefik.http.routers.ipallowlist.middlewares=test-ipallowlist"],
        host: "ipallowlist.docs.test",
        checks: &[get("/", "200|403", &[])],
    },
    Case {
        source: "ipallowlist.md @ 15900ed8 (ipStrategy.depth: not honoured, so not served)",
        name: "ipallowlist-depth",
        documented: &[
            "traefik.http.middlewares.test-ipallowlist.ipallowlist.sourcerange=127.0.0.1/32, 192.168.1.7",
            "traefik.http.middlewares.test-ipallowlist.ipallowlist.ipstrategy.depth=2",
        ],
        router: &["traefik.http.routers.ipallowlist-depth.middlewares=test-ipallowlist"],
        host: "ipallowlist-depth.docs.test",
        checks: &[Check { problem: Some("ipstrategy"), lacks: &["get / http/1.1"], ..get("/", "503", &[]) }],
    },
    Case {
        source: "ratelimit.md @ cdc80926",
        name: "ratelimit",
        documented: &[
            "traefik.http.middlewares.test-ratelimit.ratelimit.average=100",
            "traefik.http.middlewares.test-ratelimit.ratelimit.burst=200",
        ],
        router: &["traefik.http.routers.ratelimit.middlewares=test-ratelimit"],
        host: "ratelimit.docs.test",
        checks: &[get("/", "200", &["get / http/1.1"])],
    },
    Case {
        source: "redirectregex.md @ baceafbd",
        name: "redirectregex",
        documented: &[
            "traefik.http.middlewares.test-redirectregex.redirectregex.regex=^http://localhost/(.*)",
            "traefik.http.middlewares.test-redirectregex.redirectregex.replacement=http://mydomain/${1}",
        ],
        router: &[
            "traefik.http.routers.redirectregex.rule=Host(`localhost`)",
            "traefik.http.routers.redirectregex.middlewares=test-redirectregex",
        ],
        host: "localhost",
        checks: &[get("/a/b", "302", &["location: http://mydomain/a/b"])],
    },
    Case {
        source: "redirectscheme.md @ 3a304371",
        name: "redirectscheme",
        documented: &[
            "traefik.http.middlewares.test-redirectscheme.redirectscheme.scheme=https",
            "traefik.http.middlewares.test-redirectscheme.redirectscheme.permanent=true",
        ],
        router: &["traefik.http.routers.redirectscheme.middlewares=test-redirectscheme"],
        host: "redirectscheme.docs.test",
        checks: &[get("/p?q=1", "301", &["location: https://redirectscheme.docs.test/p?q=1"])],
    },
    Case {
        source: "replacepath.md @ bfe442ab",
        name: "replacepath",
        documented: &["traefik.http.middlewares.test-replacepath.replacepath.path=/foo"],
        router: &["traefik.http.routers.replacepath.middlewares=test-replacepath"],
        host: "replacepath.docs.test",
        checks: &[get("/bar", "200", &["get /foo http/1.1", "x-replaced-path: /bar"])],
    },
    Case {
        source: "replacepathregex.md @ a202cda2",
        name: "replacepathregex",
        documented: &[
            "traefik.http.middlewares.test-replacepathregex.replacepathregex.regex=^/foo/(.*)",
            "traefik.http.middlewares.test-replacepathregex.replacepathregex.replacement=/bar/$1",
        ],
        router: &["traefik.http.routers.replacepathregex.middlewares=test-replacepathregex"],
        host: "replacepathregex.docs.test",
        checks: &[get("/foo/abc", "200", &["get /bar/abc http/1.1", "x-replaced-path: /foo/abc"])],
    },
    Case {
        source: "retry.md @ 1433e319",
        name: "retry",
        documented: &[
            "traefik.http.middlewares.test-retry.retry.attempts=4",
            "traefik.http.middlewares.test-retry.retry.initialinterval=100ms",
        ],
        router: &["traefik.http.routers.retry.middlewares=test-retry"],
        host: "retry.docs.test",
        checks: &[get("/", "200", &["get / http/1.1"])],
    },
    Case {
        source: "stripprefix.md @ 4644ab2a",
        name: "stripprefix",
        documented: &["traefik.http.middlewares.test-stripprefix.stripprefix.prefixes=/foobar,/fiibar"],
        router: &["traefik.http.routers.stripprefix.middlewares=test-stripprefix"],
        host: "stripprefix.docs.test",
        checks: &[
            get("/foobar/x", "200", &["get /x http/1.1", "x-forwarded-prefix: /foobar"]),
            get("/fiibar/y", "200", &["get /y http/1.1", "x-forwarded-prefix: /fiibar"]),
            get("/other/z", "200", &["get /other/z http/1.1"]),
        ],
    },
    Case {
        source: "stripprefixregex.md @ d48a2c63",
        name: "stripprefixregex",
        documented: &["traefik.http.middlewares.test-stripprefixregex.stripprefixregex.regex=/foo/[a-z0-9]+/[0-9]+/"],
        router: &["traefik.http.routers.stripprefixregex.middlewares=test-stripprefixregex"],
        host: "stripprefixregex.docs.test",
        checks: &[get("/foo/abc/123/x", "200", &["get /x http/1.1"])],
    },
    Case {
        source: "forwardauth.md @ f938bcab (an https address: not honoured, so not served)",
        name: "forwardauth",
        documented: &[
            "traefik.http.middlewares.test-auth.forwardauth.address=https://example.com/auth",
            "traefik.http.middlewares.test-auth.forwardauth.trustForwardHeader=true",
            "traefik.http.middlewares.test-auth.forwardauth.authResponseHeaders=X-Auth-User, X-Secret",
        ],
        router: &["traefik.http.routers.forwardauth.middlewares=test-auth"],
        host: "forwardauth.docs.test",
        checks: &[Check { problem: Some("forwardauth"), lacks: &["get / http/1.1"], ..get("/", "503", &[]) }],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (automatic service assignment)",
        name: "myproxy",
        documented: &[
            "traefik.http.routers.myproxy.rule=Host(`example.net`)",
            "traefik.http.services.myservice.loadbalancer.server.port=80",
        ],
        router: &[],
        host: "example.net",
        checks: &[get("/", "200", &["get / http/1.1", "host: example.net"])],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (priority)",
        name: "priority",
        documented: &["traefik.http.routers.myrouter.priority=42"],
        // Without the priority the longer rule (36 characters) would win /b.
        router: &[
            "traefik.http.routers.myrouter.rule=Host(`priority.docs.test`)",
            "traefik.http.routers.myrouter.middlewares=mark-a",
            "traefik.http.middlewares.mark-a.headers.customrequestheaders.X-Router=myrouter",
            "traefik.http.routers.other.rule=Host(`priority.docs.test`) && Path(`/b`)",
            "traefik.http.routers.other.middlewares=mark-b",
            "traefik.http.middlewares.mark-b.headers.customrequestheaders.X-Router=other",
        ],
        host: "priority.docs.test",
        checks: &[get("/b", "200", &["x-router: myrouter"])],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (entrypoints: names no listener has)",
        name: "entrypoints",
        documented: &["traefik.http.routers.myrouter.entrypoints=ep1,ep2"],
        router: &["traefik.http.routers.myrouter.rule=Host(`entrypoints.docs.test`)"],
        host: "entrypoints.docs.test",
        checks: &[Check { problem: Some("ep1"), lacks: &["get / http/1.1"], ..get("/", "503", &[]) }],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (tls.options: not honoured, so not served)",
        name: "tlsoptions",
        documented: &["traefik.http.routers.myrouter.tls.options=foobar"],
        router: &["traefik.http.routers.myrouter.rule=Host(`tlsoptions.docs.test`)"],
        host: "tlsoptions.docs.test",
        checks: &[Check { problem: Some("tls.options"), lacks: &["get / http/1.1"], ..get("/", "503", &[]) }],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (server.scheme, passhostheader)",
        name: "passhost",
        documented: &[
            "traefik.http.services.myservice.loadbalancer.server.scheme=http",
            "traefik.http.services.myservice.loadbalancer.passhostheader=false",
            "traefik.http.services.myservice.loadbalancer.server.port=80",
        ],
        router: &["traefik.http.routers.passhost.rule=Host(`passhost.docs.test`)"],
        host: "passhost.docs.test",
        checks: &[Check { lacks: &["\nhost: passhost.docs.test"], ..get("/", "200", &["get / http/1.1"]) }],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (sticky.cookie and its options)",
        name: "sticky",
        documented: &[
            "traefik.http.services.myservice.loadbalancer.sticky.cookie=true",
            "traefik.http.services.myservice.loadbalancer.sticky.cookie.httponly=true",
            "traefik.http.services.myservice.loadbalancer.sticky.cookie.name=foobar",
            "traefik.http.services.myservice.loadbalancer.sticky.cookie.path=/foobar",
            "traefik.http.services.myservice.loadbalancer.sticky.cookie.secure=true",
            "traefik.http.services.myservice.loadbalancer.sticky.cookie.samesite=none",
            "traefik.http.services.myservice.loadbalancer.server.port=80",
        ],
        router: &["traefik.http.routers.sticky.rule=Host(`sticky.docs.test`)"],
        host: "sticky.docs.test",
        checks: &[get("/foobar/x", "200", &["set-cookie: foobar=", "httponly", "secure", "samesite=none", "path=/foobar"])],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (healthcheck path, interval, timeout)",
        name: "healthcheck",
        documented: &[
            "traefik.http.services.myservice.loadbalancer.healthcheck.path=/foo",
            "traefik.http.services.myservice.loadbalancer.healthcheck.interval=10s",
            "traefik.http.services.myservice.loadbalancer.healthcheck.timeout=10s",
            "traefik.http.services.myservice.loadbalancer.server.port=80",
        ],
        router: &["traefik.http.routers.healthcheck.rule=Host(`healthcheck.docs.test`)"],
        host: "healthcheck.docs.test",
        checks: &[get("/", "200", &["get / http/1.1"])],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (tls)",
        name: "tlsrouter",
        documented: &["traefik.http.routers.myrouter.tls=true"],
        router: &["traefik.http.routers.myrouter.rule=Host(`tlsrouter.docs.test`)"],
        host: "tlsrouter.docs.test",
        // TLS only: over plain HTTP, a redirect once the host has a certificate; none here.
        checks: &[Check { lacks: &["get / http/1.1"], ..get("/", "403", &["served over https only"]) }],
    },
    Case {
        source: "routing/providers/swarm.md @ 05867658 (responseforwarding.flushinterval)",
        name: "flush",
        documented: &["traefik.http.services.myservice.loadbalancer.responseforwarding.flushinterval=10"],
        router: &["traefik.http.routers.flush.rule=Host(`flush.docs.test`)"],
        host: "flush.docs.test",
        checks: &[get("/", "200", &[])],
    },
    Case {
        source: "routing/routers/index.md @ 43ed2f40 (v3 rule matchers, with ||, ! and parentheses; longer rules first)",
        name: "matchers",
        documented: &[
            "traefik.http.routers.m-base.rule=Host(`matchers.docs.test`)",
            "traefik.http.routers.m-base.middlewares=mark-base",
            "traefik.http.middlewares.mark-base.headers.customrequestheaders.X-Router=base",
            "traefik.http.routers.m-query.rule=Host(`matchers.docs.test`) && Query(`mobile`)",
            "traefik.http.routers.m-query.middlewares=mark-query",
            "traefik.http.middlewares.mark-query.headers.customrequestheaders.X-Router=query",
            "traefik.http.routers.m-queryre.rule=Host(`matchers.docs.test`) && QueryRegexp(`mobile`, `^(true|yes)$`)",
            "traefik.http.routers.m-queryre.middlewares=mark-queryre",
            "traefik.http.middlewares.mark-queryre.headers.customrequestheaders.X-Router=queryre",
            "traefik.http.routers.m-pathre.rule=Host(`matchers.docs.test`) && PathRegexp(`\\.(jpeg|jpg|png)$`)",
            "traefik.http.routers.m-pathre.middlewares=mark-pathre",
            "traefik.http.middlewares.mark-pathre.headers.customrequestheaders.X-Router=pathre",
            "traefik.http.routers.m-headerre.rule=Host(`matchers.docs.test`) && HeaderRegexp(`Content-Type`, `^application/(json|yaml)$`)",
            "traefik.http.routers.m-headerre.middlewares=mark-headerre",
            "traefik.http.middlewares.mark-headerre.headers.customrequestheaders.X-Router=headerre",
            "traefik.http.routers.m-method.rule=Host(`matchers.docs.test`) && (Method(`POST`) || Method(`PUT`)) && !ClientIP(`10.0.0.0/16`)",
            "traefik.http.routers.m-method.middlewares=mark-method",
            "traefik.http.middlewares.mark-method.headers.customrequestheaders.X-Router=method",
        ],
        router: &[],
        host: "matchers.docs.test",
        checks: &[
            get("/", "200", &["x-router: base"]),
            get("/search?mobile", "200", &["x-router: query"]),
            get("/search?mobile=yes", "200", &["x-router: queryre"]),
            get("/img/a.png", "200", &["x-router: pathre"]),
            Check { curl: &["-H", "Content-Type: application/yaml"], ..get("/", "200", &["x-router: headerre"]) },
            Check { curl: &["-X", "PUT"], ..get("/", "200", &["x-router: method"]) },
            Check { curl: &["-X", "DELETE"], ..get("/", "200", &["x-router: base"]) },
        ],
    },
    Case {
        source: "routing/routers/index.md @ 43ed2f40 (HostRegexp)",
        name: "hostregexp",
        documented: &["traefik.http.routers.hostregexp.rule=HostRegexp(`^.+\\.example\\.com$`)"],
        router: &[],
        host: "shop.example.com",
        checks: &[get("/", "200", &["host: shop.example.com"])],
    },
];

impl Case {
    /// Every label of the case: the page's, the router's, and the router's rule and port
    /// where the page has none.
    pub(crate) fn labels(&self) -> Vec<String> {
        let mut all: Vec<String> = vec!["traefik.enable=true".into()];
        all.extend(self.documented.iter().map(|l| (*l).to_owned()));
        all.extend(self.router.iter().map(|l| (*l).to_owned()));
        if !self.documented.iter().any(|l| l.contains(".rule="))
            && !self.router.iter().any(|l| l.contains(".rule="))
        {
            all.push(format!("traefik.http.routers.{}.rule=Host(`{}`)", self.name, self.host));
        }
        if !self.documented.iter().any(|l| l.contains(".server.port=")) {
            all.push(format!("traefik.http.services.{}.loadbalancer.server.port=80", self.name));
        }
        all
    }
}

/// A Swarm stack of every case: one whoami service each, on the `proxy` overlay, its labels
/// under `deploy.labels` (`$` doubled, as a stack file needs).
pub(crate) fn stack(image: &str) -> String {
    let mut yaml = String::from("version: '3.7'\nnetworks:\n  proxy:\n    external: true\nservices:\n");
    let command = WHOAMI.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    for case in CASES {
        let _ = write!(
            yaml,
            "  {}:\n    image: {image}\n    command: [{command}]\n    networks: [proxy]\n    stop_grace_period: 1s\n    deploy:\n      labels:\n",
            case.name
        );
        for label in case.labels() {
            let quoted = label.replace('\\', "\\\\").replace('"', "\\\"").replace('$', "$$");
            let _ = writeln!(yaml, "        - \"{quoted}\"");
        }
    }
    yaml
}

/// What `check` gets through `base` (`http://addr:port`), lower case.
async fn fetch(base: &str, host: &str, check: &Check, big: &str) -> String {
    let url = format!("{base}{}", check.path);
    let host = format!("Host: {host}");
    let mut args = vec!["-si", "-H", host.as_str()];
    args.extend(check.curl.iter().map(|a| if *a == "@BIG" { big } else { a }));
    args.push(&url);
    curl(&args).await.1.to_ascii_lowercase()
}

/// Whether `got` is what `check` wants; `loopback`: the client is 127.0.0.1.
fn meets(got: &str, check: &Check, loopback: bool) -> bool {
    let status = match check.status {
        "200|403" if loopback => "200",
        "200|403" => "403",
        s => s,
    };
    got.starts_with(&format!("http/1.1 {status}"))
        && check.has.iter().all(|h| got.contains(h))
        && !check.lacks.iter().any(|l| got.contains(l))
}

/// Runs every case's checks through `bases` (one per case, in turn), each until it passes
/// (discovery takes a moment) or `deadline`; a refused case's problem is looked for in the
/// state `state` returns.
pub(crate) async fn check_all(
    bases: &[String],
    loopback: bool,
    deadline: Duration,
    state: impl AsyncFn() -> serde_json::Value,
) {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 3_000_000]).unwrap();
    let big = format!("@{}", big.display());
    for (n, case) in CASES.iter().enumerate() {
        let base = &bases[n % bases.len()];
        for check in case.checks {
            let give_up = std::time::Instant::now() + deadline;
            loop {
                let got = fetch(base, case.host, check, &big).await;
                if meets(&got, check, loopback) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < give_up,
                    "{} ({}): {} {:?} through {base} should get {} with {:?}, without {:?}; it got:\n{got}",
                    case.name,
                    case.source,
                    check.path,
                    check.curl,
                    check.status,
                    check.has,
                    check.lacks
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Some(problem) = check.problem {
                let problems = state().await["problems"].to_string();
                assert!(
                    problems.contains(case.name) && problems.contains(problem),
                    "{}: the problem names the workload and {problem}: {problems}",
                    case.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefiks_documented_examples_behave_as_documented_on_containers() {
    let image = whoami_image().await;
    let mesh = Mesh::start_docker(|_| {}).await;
    let mut tasks = Vec::new();
    for case in CASES {
        let labels = case.labels();
        let args: Vec<&str> = labels.iter().flat_map(|l| ["-l", l.as_str()]).collect();
        tasks.push(Container::run_image(case.name, &args, image, WHOAMI).await);
    }
    let base = mesh.url("");
    let base = base.trim_end_matches('/').to_owned();
    let admin = mesh.admin_url("/api/state");
    check_all(&[base], true, Duration::from_secs(30), async || {
        let (_, body) = curl(&[&admin]).await;
        serde_json::from_str(&body).unwrap_or_default()
    })
    .await;
    drop(tasks);
}
