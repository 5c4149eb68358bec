//! The request handler: ACME challenge records to anyone; local names from the [`Zone`] in
//! force and every other name forwarded, to clients of the recursion networks only (the
//! cluster's names stay inside); metrics for each answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::challenges::ChallengeRecords;
use crate::forward::Forwarder;
use crate::rate::{RateLimit, Verdict};
use crate::zone::{Answer, Zone};

/// How long a forwarded answer is sent again as it is before it is aged anew.
const REUSE_FORWARDED: std::time::Duration = std::time::Duration::from_secs(1);

/// The DNS metrics, registered on the agent's registry.
pub struct DnsMetrics {
    queries: IntCounterVec,
    forwarded: IntCounter,
    cache_hits: IntCounter,
    duration: Histogram,
    rate_limited: IntCounter,
}

impl DnsMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let queries = IntCounterVec::new(
            Opts::new("meshgate_dns_queries_total", "DNS queries answered, by query type and response code."),
            &["type", "rcode"],
        )?;
        let forwarded =
            IntCounter::new("meshgate_dns_forwarded_total", "DNS queries sent to an upstream resolver.")?;
        let cache_hits =
            IntCounter::new("meshgate_dns_cache_hits_total", "Forwarded names answered from the cache.")?;
        let duration = Histogram::with_opts(
            HistogramOpts::new("meshgate_dns_request_duration_seconds", "Time to answer a DNS query.")
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5]),
        )?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(cache_hits.clone()))?;
        let rate_limited = IntCounter::new(
            "meshgate_dns_rate_limited_total",
            "UDP answers over their client's rate (dns.udp_rate_limit), sent empty with TC set.",
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        Ok(Self { queries, forwarded, cache_hits, duration, rate_limited })
    }
}

/// mesh-dns: the zone in force and the challenge records (each swapped whole), the
/// forwarder, who may recurse, and how many UDP answers a client gets a second.
pub struct MeshDns {
    zone: ArcSwap<Zone>,
    challenges: ArcSwap<ChallengeRecords>,
    forwarder: Forwarder,
    recursion_allowed: Vec<IpNet>,
    pub(crate) udp_rate: RateLimit,
    metrics: Option<DnsMetrics>,
    /// Answers kept as wire bytes, for the zone and challenge records in force.
    pub(crate) answers: crate::wire::Store,
}

impl MeshDns {
    #[must_use]
    pub fn new(
        zone: Zone,
        forwarder: Forwarder,
        recursion_allowed: Vec<IpNet>,
        udp_answers_per_second: u32,
        metrics: Option<DnsMetrics>,
    ) -> Self {
        let udp_rate = RateLimit::new(udp_answers_per_second);
        Self {
            zone: ArcSwap::from_pointee(zone),
            challenges: ArcSwap::default(),
            forwarder,
            recursion_allowed,
            udp_rate,
            metrics,
            answers: crate::wire::Store::default(),
        }
    }

    /// Swaps in the ACME challenge records in progress.
    pub fn set_challenges(&self, records: ChallengeRecords) {
        self.challenges.store(Arc::new(records));
        self.answers.clear();
    }

    /// Swaps in a new zone; queries in flight finish on the old one.
    pub fn set_zone(&self, zone: Zone) {
        self.zone.store(Arc::new(zone));
        self.answers.clear();
    }

    /// Counts a query answered from a kept answer, received at `received`.
    pub(crate) fn count_kept(&self, kept: &crate::wire::Kept, received: Instant) {
        if let Some(m) = &self.metrics {
            if let Some(c) = &kept.counter {
                c.inc();
            }
            if kept.is_forwarded() {
                m.cache_hits.inc();
            }
            m.duration.observe(received.elapsed().as_secs_f64());
        }
    }

    /// The query counter for `request`'s type and `code`.
    pub(crate) fn query_counter(&self, request: &Request, code: ResponseCode) -> Option<IntCounter> {
        let m = self.metrics.as_ref()?;
        Some(m.queries.with_label_values(&[query_type(request).as_str(), code.to_str()]))
    }

    pub(crate) fn may_recurse(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        self.recursion_allowed.iter().any(|n| n.contains(&ip))
    }
}

/// The `type` label of a query's counter.
fn query_type(request: &Request) -> String {
    request.queries.queries().first().map_or_else(|| "none".to_owned(), |q| q.query_type().to_string())
}

/// What to send, decided before the (borrowing) response is built. Local answers borrow
/// the zone's records; forwarded ones own theirs.
struct Reply<'a> {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<&'a Record>,
    authorities: Vec<&'a Record>,
    /// A forwarded answer, whose sections are sent as they are.
    owned: Option<Box<hickory_server::proto::op::Message>>,
    reuse: Reuse,
}

/// Whether an answer may be sent again as it is (its ID and flags set for the new query) to
/// the same question from a client of the same kind: what lets the UDP loop answer from
/// wire bytes (`udp.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reuse {
    Never,
    /// Until the zone or the challenge records change; `shuffle`: its answers are addresses
    /// of one type, sent in a new random order each time.
    WhileZoneHolds {
        shuffle: bool,
    },
    /// A forwarded answer from the cache, until this instant (its TTLs age by the second).
    Until(Instant),
}

impl Reply<'_> {
    fn error(code: ResponseCode) -> Self {
        let reuse = if code == ResponseCode::ServFail {
            Reuse::Never
        } else {
            Reuse::WhileZoneHolds { shuffle: false }
        };
        Self { code, authoritative: false, answers: Vec::new(), authorities: Vec::new(), owned: None, reuse }
    }

    /// The response's size on the wire without name compression (so never less than it
    /// will be): header, question, records, and an OPT record.
    fn wire_size_at_most(&self, request: &Request) -> usize {
        use hickory_server::proto::serialize::binary::BinEncodable as _;
        let size = |r: &Record| r.to_bytes().map_or(usize::MAX / 4, |b| b.len());
        let question: usize =
            request.queries.queries().iter().map(|q| q.to_bytes().map_or(512, |b| b.len())).sum();
        let owned = self.owned.as_deref().map_or(0, |m| {
            m.answers.iter().chain(&m.authorities).chain(&m.additionals).map(size).sum::<usize>()
        });
        let records: usize = self.answers.iter().chain(&self.authorities).map(|r| size(r)).sum();
        12 + question + records + owned + 11
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let udp = request.protocol() == hickory_server::net::xfer::Protocol::Udp;
        let verdict =
            if udp { self.udp_rate.check(request.src().ip(), Instant::now()) } else { Verdict::Answer };
        self.respond(request, verdict, response_handle).await.0
    }
}

impl MeshDns {
    /// Answers `request` (its rate-limit `verdict` already taken) and says whether the answer
    /// may be sent again as it is.
    pub(crate) async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        verdict: Verdict,
        mut response_handle: R,
    ) -> (ResponseInfo, Reuse) {
        let started = Instant::now();
        let udp = request.protocol() == hickory_server::net::xfer::Protocol::Udp;
        if verdict == Verdict::Slip {
            if let Some(m) = &self.metrics {
                m.rate_limited.inc();
            }
        }
        let queries = request.queries.queries();
        let recursion = self.may_recurse(request.src().ip());
        // Held for the whole request: local answers borrow their records.
        let zone = self.zone.load();
        let challenges = self.challenges.load();
        let reply = if verdict == Verdict::Slip {
            // Over the client's rate: no work for it, an empty truncated answer below.
            Reply::error(ResponseCode::NoError)
        } else if request.metadata.op_code != OpCode::Query {
            Reply::error(ResponseCode::NotImp)
        } else if queries.len() != 1 {
            Reply::error(ResponseCode::FormErr)
        } else if queries[0].query_class() != DNSClass::IN {
            Reply::error(ResponseCode::NotImp)
        } else {
            self.answer(&queries[0], recursion, &zone, &challenges).await
        };

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.code;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = recursion;
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, 1232));
            e
        });
        // Over UDP, an answer that may not fit is replaced by an empty one with TC set: the
        // client asks again over TCP. (A cut answer would be partial, and hickory's own
        // cutting leaves stray bytes and drops the OPT record.)
        let mut reply = reply;
        let limit = edns.as_ref().map_or(512, |e| usize::from(e.max_payload()));
        if udp && (verdict == Verdict::Slip || reply.wire_size_at_most(request) > limit) {
            metadata.truncation = true;
            if verdict == Verdict::Slip {
                reply.reuse = Reuse::Never;
            }
            reply.answers.clear();
            reply.authorities.clear();
            reply.owned = None;
        }
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let empty = Vec::new();
        let (own_answers, own_authorities, additionals) = reply
            .owned
            .as_deref()
            .map_or((&empty, &empty, &empty), |m| (&m.answers, &m.authorities, &m.additionals));
        let response = builder.build(
            metadata,
            reply.answers.iter().copied().chain(own_answers),
            reply.authorities.iter().copied().chain(own_authorities),
            std::iter::empty(),
            additionals.iter(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                reply.reuse = Reuse::Never;
                tracing::debug!(error = %e, "could not send a DNS response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_server::proto::op::Header {
                    metadata,
                    counts: hickory_server::proto::op::HeaderCounts::default(),
                })
            }
        };
        if let Some(m) = &self.metrics {
            m.queries.with_label_values(&[query_type(request).as_str(), reply.code.to_str()]).inc();
            m.duration.observe(started.elapsed().as_secs_f64());
        }
        (info, reply.reuse)
    }

    /// The reply to one well-formed query: a challenge record or a routed host to anyone;
    /// to clients of the recursion networks also the cluster's names and forwarded ones;
    /// REFUSED to the rest.
    async fn answer<'a>(
        &self,
        query: &hickory_server::proto::op::LowerQuery,
        recursion: bool,
        zone: &'a Zone,
        challenges: &'a ChallengeRecords,
    ) -> Reply<'a> {
        if let Some(records) = challenges.get(query.name()) {
            let wanted = matches!(query.query_type(), RecordType::TXT | RecordType::ANY);
            return Reply {
                code: ResponseCode::NoError,
                authoritative: true,
                answers: if wanted { records.iter().collect() } else { Vec::new() },
                authorities: Vec::new(),
                owned: None,
                reuse: Reuse::WhileZoneHolds { shuffle: false },
            };
        }
        if !recursion && !zone.is_public(query.name()) {
            // Outside the recursion networks: challenge names and routed hosts, nothing else.
            return Reply::error(ResponseCode::Refused);
        }
        match zone.answer(query.name(), query.query_type()) {
            Answer::Records(answers) => {
                let authorities = if answers.is_empty() { vec![zone.soa()] } else { Vec::new() };
                let shuffle = matches!(query.query_type(), RecordType::A | RecordType::AAAA);
                let reuse = if query.query_type() == RecordType::ANY {
                    Reuse::Never // addresses of two types, each shuffled
                } else {
                    Reuse::WhileZoneHolds { shuffle }
                };
                Reply {
                    code: ResponseCode::NoError,
                    authoritative: true,
                    answers,
                    authorities,
                    owned: None,
                    reuse,
                }
            }
            Answer::NxDomain => Reply {
                code: ResponseCode::NXDomain,
                authoritative: true,
                answers: Vec::new(),
                authorities: vec![zone.soa()],
                owned: None,
                reuse: Reuse::WhileZoneHolds { shuffle: false },
            },
            Answer::NotOurs => self.forward(query.name(), query.query_type()).await,
        }
    }

    async fn forward(
        &self,
        name: &hickory_server::proto::rr::LowerName,
        qtype: hickory_server::proto::rr::RecordType,
    ) -> Reply<'static> {
        let upstream = if let Some(hit) = self.forwarder.cached(name, qtype) {
            if let Some(m) = &self.metrics {
                m.cache_hits.inc();
            }
            Ok(hit)
        } else {
            if let Some(m) = &self.metrics {
                m.forwarded.inc();
            }
            self.forwarder.resolve(name, qtype).await
        };
        match upstream {
            Ok(u) => Reply {
                code: u.response_code,
                authoritative: false,
                answers: Vec::new(),
                authorities: Vec::new(),
                owned: Some(Box::new(u.aged())),
                reuse: Reuse::Until(u.expires().min(Instant::now() + REUSE_FORWARDED)),
            },
            Err(e) => {
                tracing::debug!(%name, %qtype, error = %e, "forwarding failed");
                Reply::error(ResponseCode::ServFail)
            }
        }
    }
}
