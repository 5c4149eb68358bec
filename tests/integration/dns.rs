//! mesh-dns with real clients: `dig` (Debian's dnsutils) over UDP and TCP, a real upstream
//! (`dnsmasq` serving a test zone), and raw packets for the malformed cases.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::net::UdpSocket;
use tokio::process::Command;

use crate::harness::{service_with, Dnsmasq, Mesh};
use crate::resilience::reqwest_text;

/// Runs dig against `server`; returns its full output.
pub(crate) async fn dig(server: SocketAddr, args: &[&str]) -> String {
    let port = server.port().to_string();
    let out = Command::new("dig")
        .args([&format!("@{}", server.ip()), "-p", &port, "+time=3", "+tries=1"])
        .args(args)
        .output()
        .await
        .expect("dig is installed (the README's test command installs dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn status(out: &str) -> &str {
    out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("none")
}

/// The A records (addresses) of a dig answer section.
fn addresses(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && (f[3] == "A" || f[3] == "AAAA")).then(|| f[4].to_owned())
        })
        .collect();
    v.sort();
    v
}

fn tasks(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.77.{}.{}", i / 250, i % 250 + 1)).collect()
}

const ROUTES_STACK: &str = r#"
[[services]]
name = "shop_web"
stack = "shop"
tasks = [{ address = "10.9.0.1", id = "shop_web.1.abc" }, { address = "10.9.0.2", id = "shop_web.2.def" }, { address = "fd00::9", id = "shop_web.3.ghi" }, { address = "10.9.0.4", health = "unhealthy" }]
[[services.http]]
hosts = ["shop.example.test"]
port = 80
[[services.l4]]
protocol = "tcp"
published = 8443
target = 443
"#;

async fn mesh_with_dns(
    routes: &str,
    tweak: impl FnOnce(&mut meshgate::config::Config),
) -> (Mesh, SocketAddr) {
    let mesh = Mesh::start_with(routes, |c| {
        c.dns.listen = Some("127.0.0.1:0".parse().unwrap());
        c.dns.upstreams = vec!["127.0.0.1:9".parse().unwrap()];
        c.dns.upstream_timeout = Duration::from_millis(500);
        tweak(c);
    })
    .await;
    let addr = mesh.agent.dns_addr.expect("dns runs");
    (mesh, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_local_name_form_over_udp_and_tcp() {
    let (_mesh, dns) = mesh_with_dns(ROUTES_STACK, |c| {
        c.dns.answer_routed_hosts = true;
        c.dns.node_addresses = vec!["192.0.2.10".parse().unwrap()];
    })
    .await;
    for transport in ["+notcp", "+tcp"] {
        for name in [
            "shop_web",
            "web",
            "WEB.Mesh.Internal",
            "shop_web.mesh.internal",
            "tasks.web",
            "tasks.shop_web.mesh.internal",
        ] {
            let out = dig(dns, &[transport, name, "A"]).await;
            assert_eq!(status(&out), "NOERROR", "{name} {transport}: {out}");
            assert_eq!(
                addresses(&out),
                ["10.9.0.1", "10.9.0.2"],
                "{name} {transport}: healthy tasks only\n{out}"
            );
            assert!(out.contains("flags: qr aa"), "authoritative: {out}");
        }
        let out = dig(dns, &[transport, "web", "AAAA"]).await;
        assert_eq!(addresses(&out), ["fd00::9"], "{out}");
        let out = dig(dns, &[transport, "shop_web.1.abc", "A"]).await;
        assert_eq!(addresses(&out), ["10.9.0.1"], "task name: {out}");
        let out = dig(dns, &[transport, "_8443._tcp.web.mesh.internal", "SRV"]).await;
        assert!(out.contains("SRV\t0 10 8443 web.mesh.internal."), "SRV: {out}");
        let out = dig(dns, &[transport, "shop.example.test", "A"]).await;
        assert_eq!(addresses(&out), ["192.0.2.10"], "routed host: {out}");
    }
    // NODATA: the name exists, not the type; NXDOMAIN: under our domain and unknown.
    let out = dig(dns, &["web", "MX"]).await;
    assert!(
        status(&out) == "NOERROR" && out.contains("ANSWER: 0") && out.contains("IN\tSOA\tns.mesh.internal."),
        "NODATA with SOA: {out}"
    );
    let out = dig(dns, &["db.mesh.internal", "A"]).await;
    assert!(status(&out) == "NXDOMAIN" && out.contains("IN\tSOA"), "NXDOMAIN with SOA: {out}");
    // EDNS0 is answered with our payload size; the TTL is the configured 5 s.
    let out = dig(dns, &["+edns=0", "+bufsize=4096", "web", "A"]).await;
    assert!(out.contains("EDNS: version: 0") && out.contains("udp: 1232"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("web.") && l.split_whitespace().nth(1) == Some("5")),
        "TTL 5: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_truncated_over_udp_and_complete_over_tcp() {
    let (_mesh, dns) =
        mesh_with_dns(&service_with("big", &["big.test"], "/", "http", &tasks(120)), |_| {}).await;
    let out = dig(dns, &["+ignore", "+noedns", "big", "A"]).await;
    assert!(out.contains("flags: qr aa tc"), "a 512-byte UDP answer is truncated: {out}");
    let out = dig(dns, &["big", "A"]).await; // dig retries over TCP on TC
    assert_eq!(addresses(&out).len(), 120, "all 120 over TCP: {out}");
}

/// A dnsmasq serving a small test zone on an ephemeral port; stopped on drop.
fn test_zone() -> Dnsmasq {
    let mut records: Vec<String> = [
        "--address=/up.test/192.0.2.7",
        "--address=/gone.test/",
        "--host-record=ttl.up.test,192.0.2.8",
        "--local-ttl=60",
    ]
    .map(str::to_owned)
    .into();
    // 100 addresses for one name: too big for a 1232-byte UDP answer.
    records.extend((0..100).map(|i| format!("--host-record=big.up.test,198.51.100.{}", i + 1)));
    Dnsmasq::start_anywhere(&records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_cached_and_refused_to_outsiders() {
    let upstream = test_zone();
    let (mesh, dns) = mesh_with_dns(ROUTES_STACK, |c| {
        c.dns.upstreams = vec![upstream.addr];
        c.dns.recursion_networks = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    crate::harness::eventually("dnsmasq answers", Duration::from_secs(10), async || {
        addresses(&dig(upstream.addr, &["a.up.test"]).await) == ["192.0.2.7"]
    })
    .await;
    for transport in ["+notcp", "+tcp"] {
        let out = dig(dns, &[transport, "a.up.test", "A"]).await;
        assert_eq!((status(&out), addresses(&out)), ("NOERROR", vec!["192.0.2.7".to_owned()]), "{out}");
        assert!(out.contains(" ra"), "recursion available: {out}");
    }
    let out = dig(dns, &["ttl.up.test", "A"]).await;
    let ttl: u32 = out
        .lines()
        .find(|l| l.starts_with("ttl.up.test."))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(ttl <= 60, "the upstream TTL is honoured: {out}");
    // The upstream's UDP answer is truncated: the forwarder retries over TCP, and the client
    // (over TCP to us) gets all 100.
    let out = dig(dns, &["+tcp", "big.up.test", "A"]).await;
    assert_eq!(addresses(&out).len(), 100, "{out}");
    let out = dig(dns, &["nothing.gone.test", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");

    let metrics = reqwest_text(&mesh.admin_url("/metrics")).await;
    let value = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("meshgate_dns_cache_hits_total") >= 1.0,
        "the second a.up.test came from the cache:\n{metrics}"
    );
    assert!(value("meshgate_dns_forwarded_total") >= 2.0, "{metrics}");
    assert!(
        metrics.contains("meshgate_dns_queries_total{rcode=\"NXDomain\",type=\"A\"}")
            || metrics.contains("rcode=\"Non-Existent Domain\""),
        "{metrics}"
    );

    // A client outside the recursion networks (the internet, facing a node that answers
    // ACME challenges): neither forwarding nor the cluster's own names.
    let out = dig(dns, &["-b", "127.0.0.2", "a.up.test", "A"]).await;
    assert_eq!(status(&out), "REFUSED", "{out}");
    let out = dig(dns, &["-b", "127.0.0.2", "web", "A"]).await;
    assert_eq!(status(&out), "REFUSED", "service names stay inside the recursion networks: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_costs_a_bounded_servfail_and_never_blocks_local_names() {
    // An upstream that swallows every query.
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let (_mesh, dns) = mesh_with_dns(ROUTES_STACK, |c| {
        c.dns.upstreams = vec![sink_addr];
        c.dns.upstream_timeout = Duration::from_millis(800);
    })
    .await;
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let out = dig(dns, &["+time=5", "stuck.example", "A"]).await;
        (status(&out).to_owned(), started.elapsed())
    });
    // While that waits on the dead upstream, local names answer.
    for _ in 0..20 {
        let out = dig(dns, &["web", "A"]).await;
        assert_eq!(addresses(&out), ["10.9.0.1", "10.9.0.2"]);
    }
    let (status, took) = slow.await.unwrap();
    assert_eq!(status, "SERVFAIL");
    assert!(
        took < Duration::from_secs(4),
        "SERVFAIL after the upstream timeout, not the client's ({took:?})"
    );
    drop(sink);
}

fn query(id: u16, name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

async fn exchange(client: &UdpSocket, dns: SocketAddr, bytes: &[u8]) -> Option<Message> {
    client.send_to(bytes, dns).await.unwrap();
    let mut buf = [0u8; 4096];
    match tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => {
            Some(Message::from_vec(&buf[..n]).expect("the server only sends well-formed messages"))
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_formerr_notimp_or_silence_and_the_server_keeps_answering() {
    let (_mesh, dns) = mesh_with_dns(ROUTES_STACK, |_| {}).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let valid = query(1, "web.", RecordType::A).to_vec().unwrap();

    let mut two_questions = query(2, "web.", RecordType::A);
    two_questions.add_query(Query::query(Name::from_ascii("shop_web.").unwrap(), RecordType::A));
    let mut chaos = query(3, "web.", RecordType::A);
    let mut q = Query::query(Name::from_ascii("web.").unwrap(), RecordType::A);
    q.set_query_class(DNSClass::CH);
    chaos.queries = vec![q];
    let mut status_op = query(4, "web.", RecordType::A);
    status_op.metadata.op_code = OpCode::Status;
    let cases: Vec<(&str, Vec<u8>, Option<ResponseCode>)> = vec![
        ("two questions", two_questions.to_vec().unwrap(), Some(ResponseCode::FormErr)),
        ("class CH", chaos.to_vec().unwrap(), Some(ResponseCode::NotImp)),
        ("opcode STATUS", status_op.to_vec().unwrap(), Some(ResponseCode::NotImp)),
        ("header cut short", valid[..7].to_vec(), None),
        ("question cut short", valid[..valid.len() - 3].to_vec(), Some(ResponseCode::FormErr)),
    ];
    for (what, bytes, want) in cases {
        let got = exchange(&client, dns, &bytes).await.map(|m| m.metadata.response_code);
        assert_eq!(got, want, "{what}");
    }
    // Fuzz: random bytes of random lengths (seeded, so a failure can be replayed).
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for i in 0..2000 {
        let len = rng.usize(0..600);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if i % 2 == 0 && junk.len() > 12 {
            junk[2] &= 0x7f; // a query, not a response, so it gets parsed further
        }
        client.send_to(&junk, dns).await.unwrap();
    }
    // Oversized: 64 KiB of zeros.
    let _ = client.send_to(&vec![0u8; 65_000], dns).await;
    let mut buf = [0u8; 4096];
    while tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf)).await.is_ok() {}
    let answer = exchange(&client, dns, &valid).await.expect("still answering after the garbage");
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(answer.answers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_swaps_under_query_load_give_no_wrong_answer() {
    let one = service_with(
        "svc",
        &["svc.test"],
        "/",
        "http",
        &["10.1.0.1".into(), "10.1.0.2".into(), "10.1.0.3".into()],
    );
    let two = service_with("svc", &["svc.test"], "/", "http", &["10.2.0.1".into(), "10.2.0.2".into()]);
    // Four clients asking as fast as they can, from one address: no rate limit here.
    let (mesh, dns) = mesh_with_dns(&one, |c| c.dns.udp_rate_limit = 0).await;
    let states = [
        meshgate::provider::file::parse("one".as_ref(), &one, "swap").unwrap(),
        meshgate::provider::file::parse("two".as_ref(), &two, "swap").unwrap(),
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..4u16 {
        let stop = stop.clone();
        clients.spawn(async move {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let (mut answered, mut wrong) = (0, Vec::new());
            let mut id = c * 10_000;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                id = id.wrapping_add(1);
                let Some(m) =
                    exchange(&socket, dns, &query(id, "svc.", RecordType::A).to_vec().unwrap()).await
                else {
                    continue;
                };
                let mut got: Vec<String> = m
                    .answers
                    .iter()
                    .filter_map(|r| if let RData::A(a) = &r.data { Some(a.0.to_string()) } else { None })
                    .collect();
                got.sort();
                if got != ["10.1.0.1", "10.1.0.2", "10.1.0.3"] && got != ["10.2.0.1", "10.2.0.2"] {
                    wrong.push(got);
                }
                answered += 1;
            }
            (answered, wrong)
        });
    }
    for i in 0..300 {
        mesh.agent.hub.publish(meshgate::provider::file::NAME, states[i % 2].clone());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    while let Some(r) = clients.join_next().await {
        let (answered, wrong) = r.unwrap();
        assert!(wrong.is_empty(), "answers mixing two zones: {wrong:?}");
        total += answered;
    }
    assert!(total > 300, "the load ran ({total} answers)");
}

/// mesh-dns answers a question asked again from the wire bytes of its first answer
/// (`mesh-dns/src/wire.rs`): each answer still carries its own query's ID, RD and CD flags
/// and letter case, the addresses come in a new order, every query is counted, and a new
/// zone is what the very next query gets, to clients of the recursion networks and to others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_asked_again_gets_its_own_id_flags_and_case_and_the_zone_in_force() {
    let three = ["10.1.0.1".to_owned(), "10.1.0.2".to_owned(), "10.1.0.3".to_owned()];
    let one = service_with("svc", &["svc.test"], "/", "http", &three);
    let two = service_with("svc", &["svc.test"], "/", "http", &["10.2.0.1".into()]);
    let (mesh, dns) = mesh_with_dns(&one, |c| {
        c.dns.udp_rate_limit = 0;
        c.dns.answer_routed_hosts = true;
        c.dns.node_addresses = vec!["192.0.2.10".parse().unwrap()];
        c.dns.recursion_networks = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = async |id: u16, name: &str| {
        let mut q = query(id, name, RecordType::A);
        q.metadata.recursion_desired = id.is_multiple_of(3);
        q.metadata.checking_disabled = id.is_multiple_of(5);
        let m = exchange(&socket, dns, &q.to_vec().unwrap()).await.expect("answered");
        assert_eq!(
            (m.metadata.id, m.metadata.recursion_desired, m.metadata.checking_disabled),
            (id, id.is_multiple_of(3), id.is_multiple_of(5)),
            "the query's own ID and flags"
        );
        assert_eq!(m.queries[0].name().to_string(), name, "the question as asked");
        let got: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| if let RData::A(a) = &r.data { Some(a.0.to_string()) } else { None })
            .collect();
        got
    };
    let mut firsts = std::collections::HashSet::new();
    for id in 0..100u16 {
        let mut got = ask(id, if id.is_multiple_of(2) { "svc." } else { "SvC." }).await;
        firsts.insert(got[0].clone());
        got.sort();
        assert_eq!(got, three, "query {id}");
    }
    assert_eq!(firsts.len(), 3, "each address comes first at times: {firsts:?}");
    let metrics = reqwest_text(&mesh.admin_url("/metrics")).await;
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("meshgate_dns_queries_total{") && l.contains("type=\"A\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, 100, "every query counted:\n{metrics}");
    // A routed host, from a client outside the recursion networks and from one inside.
    for _ in 0..3 {
        assert_eq!(addresses(&dig(dns, &["-b", "127.0.0.2", "svc.test", "A"]).await), ["192.0.2.10"]);
        assert_eq!(status(&dig(dns, &["-b", "127.0.0.2", "svc", "A"]).await), "REFUSED");
        assert_eq!(addresses(&dig(dns, &["svc", "A"]).await).len(), 3);
    }

    let state = meshgate::provider::file::parse("two".as_ref(), &two, "swap").unwrap();
    mesh.agent.hub.publish(meshgate::provider::file::NAME, state);
    let mut id = 1000;
    crate::harness::eventually("the new zone is served", Duration::from_secs(10), async || {
        id += 1;
        ask(id, "svc.").await == ["10.2.0.1"]
    })
    .await;
    for id in 2000..2050u16 {
        assert_eq!(ask(id, "SVC.").await, ["10.2.0.1"], "query {id} after the swap");
    }
    assert_eq!(status(&dig(dns, &["-b", "127.0.0.2", "svc", "A"]).await), "REFUSED");
}

/// Finding 6 of "Hold under abuse": a truncated UDP answer is a well-formed message (TC set,
/// no stray bytes, its OPT record when the query had one), and the apex of the mesh domain
/// exists (its SOA; NODATA for other types), as names exist below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_answers_are_well_formed_and_the_apex_exists() {
    let (_mesh, dns) =
        mesh_with_dns(&service_with("big", &["big.test"], "/", "http", &tasks(200)), |_| {}).await;
    for edns in ["+noedns", "+bufsize=1232"] {
        let out = dig(dns, &["+ignore", edns, "big", "A"]).await;
        assert!(out.contains("flags: qr aa tc"), "{edns}: truncated: {out}");
        assert!(!out.to_lowercase().contains("extra bytes") && !out.contains("malformed"), "{edns}: {out}");
        if edns == "+bufsize=1232" {
            assert!(out.contains("OPT PSEUDOSECTION"), "the OPT record is kept: {out}");
        }
    }
    let out = dig(dns, &["mesh.internal", "SOA"]).await;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.lines().any(|l| !l.starts_with(';') && l.contains("\tSOA\t")), "the apex's SOA: {out}");
    let out = dig(dns, &["mesh.internal", "A"]).await;
    assert_eq!(status(&out), "NOERROR", "the apex exists, without an A record: {out}");
}

/// Finding 6 of "Hold under abuse", amplification: a client over `dns.udp_rate_limit` gets
/// empty answers with TC set (about the size of its query: nothing to amplify), a real client
/// then asks over TCP and gets everything, and another client keeps its own rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_udp_rate_gets_truncated_answers_and_tcp_still_answers() {
    let web = service_with("web", &["web.test"], "/", "http", &tasks(20));
    let (mesh, dns) = mesh_with_dns(&web, |c| c.dns.udp_rate_limit = 20).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let q = query(7, "web.", RecordType::A).to_vec().unwrap();
    let (mut full, mut slipped, mut biggest_slip) = (0, 0, 0);
    for _ in 0..100 {
        client.send_to(&q, dns).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .expect("every query is answered")
            .unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        if m.metadata.truncation {
            assert!(m.answers.is_empty(), "a slipped answer carries no record");
            slipped += 1;
            biggest_slip = biggest_slip.max(n);
        } else {
            assert_eq!(m.answers.len(), 20);
            full += 1;
        }
    }
    // 20 a second: the burst, plus what came back while asking.
    assert!((20..40).contains(&full), "{full} full answers, {slipped} slipped");
    assert!(
        biggest_slip <= q.len() + 16,
        "a slipped answer ({biggest_slip} bytes) is no bigger than the query ({})",
        q.len()
    );
    assert_eq!(addresses(&dig(dns, &["+tcp", "web", "A"]).await).len(), 20, "TCP is not limited");
    let out = dig(dns, &["-b", "127.0.0.2", "+notcp", "+ignore", "web", "A"]).await;
    assert_eq!(addresses(&out).len(), 20, "another client has its own rate: {out}");
    let metrics = reqwest_text(&mesh.admin_url("/metrics")).await;
    let line = metrics.lines().find(|l| l.starts_with("meshgate_dns_rate_limited_total")).unwrap_or_default();
    assert_eq!(line, format!("meshgate_dns_rate_limited_total {slipped}"), "{metrics}");
}
