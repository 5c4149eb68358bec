//! The access log: one line per request (per upgraded connection, at its end), in NCSA
//! `common`/`combined`, nginx-proxy's `vhost` or JSON with Traefik's field names (the ones
//! log pipelines built for Traefik already parse; nginx has no standard JSON format).
//!
//! Lines are formatted and written by a thread of their own: the request path only hands
//! over a record through a bounded channel, and when that is full the line is counted as
//! dropped (`meshgate_access_log_dropped_total`), never waited for.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{header, HeaderMap, HeaderName, Method, Request, Version};
use prometheus::IntCounter;

use crate::config::{AccessFormat, LogConfig};

/// Records waiting for the writer at most; more are dropped.
const QUEUE: usize = 16 * 1024;

/// Headers never written as they are: they carry credentials.
const SECRET: [HeaderName; 4] =
    [header::AUTHORIZATION, header::PROXY_AUTHORIZATION, header::COOKIE, header::SET_COOKIE];

/// A status filter entry: one code or an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Codes(u16, u16);

/// A bad `log.access_status` entry.
#[derive(Debug, thiserror::Error)]
#[error("log.access_status: `{0}` is not a status code or a range of them (write 404 or 500-599)")]
pub struct BadStatus(String);

/// Which requests are logged (Traefik's filters: a request matching any is kept).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    codes: Vec<Codes>,
    min_duration: Duration,
}

impl Filter {
    /// # Errors
    /// An entry of `codes` that is neither a code nor a range.
    pub fn new(codes: &[String], min_duration: Duration) -> Result<Self, BadStatus> {
        let codes = codes
            .iter()
            .map(|c| {
                let c = c.trim();
                let (lo, hi) = c.split_once('-').unwrap_or((c, c));
                match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                    (Ok(lo), Ok(hi)) if (100..=999).contains(&lo) && lo <= hi && hi <= 999 => {
                        Ok(Codes(lo, hi))
                    }
                    _ => Err(BadStatus(c.to_owned())),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { codes, min_duration })
    }

    fn keeps(&self, status: u16, took: Duration) -> bool {
        if self.codes.is_empty() && self.min_duration.is_zero() {
            return true;
        }
        self.codes.iter().any(|c| (c.0..=c.1).contains(&status))
            || (!self.min_duration.is_zero() && took >= self.min_duration)
    }
}

/// Where lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Sink {
    Stdout,
    Stderr,
    File(std::path::PathBuf),
}

/// The log's front: filters, hands records to the writer, counts what it had to drop.
pub struct AccessLog {
    queue: SyncSender<Record>,
    filter: Filter,
    headers: Vec<HeaderName>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
}

/// Why the access log cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Status(#[from] BadStatus),
    #[error("log.access_headers: `{0}` is not a header name")]
    Header(String),
    #[error("log.access: cannot open {0} for appending: {1} (give a writable file, stdout, stderr or off)")]
    Open(String, std::io::Error),
}

impl AccessLog {
    /// The log `config` asks for, with its writer thread started; `None` when it is off.
    ///
    /// # Errors
    /// A bad filter or header name, or a file that cannot be opened.
    pub fn start(config: &LogConfig, dropped: IntCounter) -> Result<Option<Arc<Self>>, StartError> {
        let sink = match config.access.trim() {
            "off" | "false" | "none" | "" => return Ok(None),
            "stdout" | "-" => Sink::Stdout,
            "stderr" => Sink::Stderr,
            path => Sink::File(path.into()),
        };
        let filter = Filter::new(&config.access_status, config.access_min_duration)?;
        let headers = config
            .access_headers
            .iter()
            .map(|h| HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| StartError::Header(h.clone())))
            .collect::<Result<_, _>>()?;
        let out = open(&sink).map_err(|e| StartError::Open(config.access.clone(), e))?;
        let (queue, records) = std::sync::mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer { format: config.access_format, sink, out, reopen: reopen.clone() };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(&records))
            .map_err(|e| StartError::Open("(a thread for it)".into(), e))?;
        Ok(Some(Arc::new(Self { queue, filter, headers, reopen, dropped })))
    }

    /// Reopens the log file before the next line (SIGUSR1, after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// What is known of a request when its head arrives.
    #[must_use]
    pub fn begin<B>(self: &Arc<Self>, req: &Request<B>, client: SocketAddr, secure: bool) -> Pending {
        let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let h = req.headers();
        let host = h
            .get(header::HOST)
            .map(text)
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
            .unwrap_or_default();
        Pending {
            log: self.clone(),
            record: Box::new(Record {
                start: SystemTime::now(),
                started: Instant::now(),
                took: Duration::ZERO,
                client,
                secure,
                method: req.method().clone(),
                target: req.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                host,
                version: req.version(),
                request_bytes: content_length(h),
                referer: h.get(header::REFERER).map(text),
                user_agent: h.get(header::USER_AGENT).map(text),
                headers: self
                    .headers
                    .iter()
                    .filter_map(|n| Some((n.clone(), redacted(n, h.get(n)?))))
                    .collect(),
                status: 0,
                origin_status: 0,
                bytes: 0,
                route: None,
                task: None,
                attempts: 0,
            }),
        }
    }

    fn finish(&self, mut record: Box<Record>) {
        record.took = record.started.elapsed();
        if !self.filter.keeps(record.status, record.took) {
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.queue.try_send(*record) {
            self.dropped.inc();
        }
    }
}

fn content_length(h: &HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
}

fn redacted(name: &HeaderName, value: &http::HeaderValue) -> String {
    if SECRET.contains(name) {
        "REDACTED".to_owned()
    } else {
        String::from_utf8_lossy(value.as_bytes()).into_owned()
    }
}

/// One request's line in the making; written when it is dropped (the response is done),
/// unless its route turned the log off.
pub struct Pending {
    log: Arc<AccessLog>,
    record: Box<Record>,
}

impl Pending {
    /// The answer's status (`origin`: it came from the task, not from meshgate).
    pub fn status(&mut self, status: u16, origin: bool) {
        self.record.status = status;
        self.record.origin_status = if origin { status } else { 0 };
    }

    /// The route that took the request.
    pub fn route(&mut self, names: &Arc<RouteNames>) {
        self.record.route = Some(names.clone());
    }

    /// The task the request went to (called again on a retry).
    pub fn task(&mut self, addr: SocketAddr) {
        self.record.task = Some(addr);
        self.record.attempts += 1;
    }

    /// Body bytes sent to the client.
    pub fn sent(&mut self, bytes: u64) {
        self.record.bytes += bytes;
    }

    /// Bytes received from the client on an upgraded connection.
    pub fn received(&mut self, bytes: u64) {
        self.record.request_bytes += bytes;
    }

    /// The request body's bytes as counted (in place of its `Content-Length`).
    pub fn received_exactly(&mut self, bytes: u64) {
        self.record.request_bytes = bytes;
    }

    /// Writes the line now.
    pub fn finish(self) {
        self.log.finish(self.record);
    }
}

/// What a line says.
struct Record {
    start: SystemTime,
    started: Instant,
    took: Duration,
    client: SocketAddr,
    secure: bool,
    method: Method,
    target: String,
    host: String,
    version: Version,
    request_bytes: u64,
    referer: Option<String>,
    user_agent: Option<String>,
    headers: Vec<(HeaderName, String)>,
    status: u16,
    origin_status: u16,
    bytes: u64,
    route: Option<Arc<RouteNames>>,
    task: Option<SocketAddr>,
    attempts: u32,
}

/// A route's names as its lines give them (made once per route table).
#[derive(Debug, Default)]
pub struct RouteNames {
    pub router: String,
    pub service: String,
}

struct Writer {
    format: AccessFormat,
    sink: Sink,
    out: Box<dyn std::io::Write + Send>,
    reopen: Arc<AtomicBool>,
}

fn open(sink: &Sink) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(match sink {
        Sink::Stdout => Box::new(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout())),
        Sink::Stderr => Box::new(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr())),
        Sink::File(path) => Box::new(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::fs::OpenOptions::new().create(true).append(true).open(path)?,
        )),
    })
}

impl Writer {
    /// Writes records as they come, flushing whenever none is waiting; ends when the
    /// front is gone.
    fn run(mut self, records: &Receiver<Record>) {
        let mut line = String::with_capacity(512);
        loop {
            let record = match records.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => {
                    self.flush();
                    match records.recv() {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
                Err(TryRecvError::Disconnected) => {
                    self.flush();
                    return;
                }
            };
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.flush();
                match open(&self.sink) {
                    Ok(out) => self.out = out,
                    Err(e) => tracing::warn!(
                        "access log: cannot reopen {:?}: {e}; writing on to the old file",
                        self.sink
                    ),
                }
            }
            line.clear();
            format_line(self.format, &record, &mut line);
            if let Err(e) = self.out.write_all(line.as_bytes()) {
                tracing::warn!("access log: cannot write: {e}");
            }
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::warn!("access log: cannot write: {e}");
        }
    }
}

fn format_line(format: AccessFormat, r: &Record, line: &mut String) {
    let rfc3339 = humantime::format_rfc3339_nanos(r.start).to_string();
    if format == AccessFormat::Json {
        json_line(r, &rfc3339, line);
        return;
    }
    if format == AccessFormat::Vhost {
        let _ = write!(line, "{} ", or_dash(&r.host));
    }
    let _ = write!(
        line,
        "{} - - [{}] \"{} {} {}\" {} {}",
        r.client.ip(),
        clf_time(&rfc3339),
        r.method,
        escaped(&r.target),
        protocol(r.version),
        r.status,
        r.bytes
    );
    if format != AccessFormat::Common {
        let _ = write!(
            line,
            " \"{}\" \"{}\"",
            escaped(r.referer.as_deref().unwrap_or("-")),
            escaped(r.user_agent.as_deref().unwrap_or("-"))
        );
    }
    if format == AccessFormat::Vhost {
        let _ = write!(line, " \"{}\"", r.task.map_or_else(|| "-".to_owned(), |t| t.to_string()));
    }
    line.push('\n');
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// `2026-11-28T13:55:07.123Z` as NCSA's `28/Nov/2026:13:55:07 +0000`.
fn clf_time(rfc3339: &str) -> String {
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month =
        rfc3339.get(5..7).and_then(|m| m.parse::<usize>().ok()).and_then(|m| MONTHS.get(m.wrapping_sub(1)));
    match (rfc3339.get(0..4), month, rfc3339.get(8..10), rfc3339.get(11..19)) {
        (Some(y), Some(m), Some(d), Some(t)) => format!("{d}/{m}/{y}:{t} +0000"),
        _ => rfc3339.to_owned(),
    }
}

/// A text field inside double quotes: quotes, backslashes and control bytes escaped as
/// nginx does (`\x22`), so a client cannot forge a line or a field.
fn escaped(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '"' || c == '\\' || c.is_ascii_control() {
            let _ = write!(out, "\\x{:02X}", c as u32);
        } else {
            out.push(c);
        }
    }
    out.into()
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn json_line(r: &Record, rfc3339: &str, line: &mut String) {
    let (path, _) = r.target.split_once('?').unwrap_or((&r.target, ""));
    let port = r.host.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    let host = port.map_or(r.host.as_str(), |_| r.host.rsplit_once(':').map_or("", |(h, _)| h));
    let scheme = if r.secure { "https" } else { "http" };
    let mut o = serde_json::Map::with_capacity(32);
    let mut put = |k: &str, v: serde_json::Value| {
        o.insert(k.to_owned(), v);
    };
    put("ClientAddr", r.client.to_string().into());
    put("ClientHost", r.client.ip().to_string().into());
    put("ClientPort", r.client.port().to_string().into());
    put("ClientUsername", "-".into());
    put("DownstreamContentSize", r.bytes.into());
    put("DownstreamStatus", r.status.into());
    put("Duration", u64::try_from(r.took.as_nanos()).unwrap_or(u64::MAX).into());
    put("OriginContentSize", if r.origin_status == 0 { 0 } else { r.bytes }.into());
    put("OriginStatus", r.origin_status.into());
    put("RequestAddr", r.host.clone().into());
    put("RequestContentSize", r.request_bytes.into());
    put("RequestHost", host.into());
    put("RequestMethod", r.method.as_str().into());
    put("RequestPath", r.target.clone().into());
    put("RequestPort", port.map_or_else(|| "-".to_owned(), |p| p.to_string()).into());
    put("RequestProtocol", protocol(r.version).into());
    put("RequestScheme", scheme.into());
    put("RetryAttempts", r.attempts.saturating_sub(1).into());
    if let Some(route) = &r.route {
        put("RouterName", route.router.as_str().into());
        put("ServiceName", route.service.as_str().into());
    }
    if let Some(task) = r.task {
        put("ServiceAddr", task.to_string().into());
        put("ServiceURL", format!("http://{task}{path}").into());
    }
    put("StartUTC", rfc3339.into());
    put("entryPointName", if r.secure { "websecure" } else { "web" }.into());
    if let Some(v) = &r.referer {
        put("request_Referer", v.clone().into());
    }
    if let Some(v) = &r.user_agent {
        put("request_User-Agent", v.clone().into());
    }
    for (name, value) in &r.headers {
        put(&format!("request_{}", title_case(name.as_str())), value.clone().into());
    }
    put("level", "info".into());
    put("msg", "".into());
    put("time", rfc3339.into());
    line.push_str(&serde_json::Value::Object(o).to_string());
    line.push('\n');
}

/// `x-request-id` as `X-Request-Id`, the spelling Traefik's `request_*` fields use.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next().map_or_else(String::new, |f| f.to_ascii_uppercase().to_string() + c.as_str())
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_874_107),
            started: Instant::now(),
            took: Duration::from_millis(3),
            client: "203.0.113.7:51000".parse().unwrap(),
            secure: false,
            method: Method::GET,
            target: "/a \"b\"?q=1".into(),
            host: "app.test:8080".into(),
            version: Version::HTTP_11,
            request_bytes: 0,
            referer: None,
            user_agent: Some("curl/8".into()),
            headers: vec![(header::AUTHORIZATION, "REDACTED".into())],
            status: 200,
            origin_status: 200,
            bytes: 12,
            route: Some(Arc::new(RouteNames { router: "app".into(), service: "web".into() })),
            task: Some("10.0.1.5:80".parse().unwrap()),
            attempts: 1,
        }
    }

    #[test]
    fn text_lines_are_ncsa_with_quotes_escaped() {
        let mut line = String::new();
        format_line(AccessFormat::Combined, &record(), &mut line);
        assert_eq!(
            line,
            "203.0.113.7 - - [28/Nov/2026:13:55:07 +0000] \"GET /a \\x22b\\x22?q=1 HTTP/1.1\" 200 12 \"-\" \"curl/8\"\n"
        );
        line.clear();
        format_line(AccessFormat::Common, &record(), &mut line);
        assert!(line.ends_with("HTTP/1.1\" 200 12\n"), "{line}");
        line.clear();
        format_line(AccessFormat::Vhost, &record(), &mut line);
        assert!(line.starts_with("app.test:8080 203.0.113.7 - - ["), "{line}");
        assert!(line.ends_with("\"curl/8\" \"10.0.1.5:80\"\n"), "{line}");
    }

    #[test]
    fn json_lines_carry_traefiks_names() {
        let mut line = String::new();
        format_line(AccessFormat::Json, &record(), &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ClientHost"], "203.0.113.7");
        assert_eq!(v["DownstreamStatus"], 200);
        assert_eq!(v["RequestHost"], "app.test");
        assert_eq!(v["RequestPort"], "8080");
        assert_eq!(v["RouterName"], "app");
        assert_eq!(v["ServiceAddr"], "10.0.1.5:80");
        assert_eq!(v["RetryAttempts"], 0);
        assert_eq!(v["Duration"], 3_000_000);
        assert_eq!(v["request_Authorization"], "REDACTED");
        assert_eq!(v["StartUTC"], "2026-11-28T13:55:07.000000000Z");
    }

    #[test]
    fn filters_keep_a_request_matching_any() {
        let f = Filter::new(&["404".into(), "500-599".into()], Duration::from_secs(1)).unwrap();
        assert!(f.keeps(404, Duration::ZERO));
        assert!(f.keeps(503, Duration::ZERO));
        assert!(f.keeps(200, Duration::from_secs(2)));
        assert!(!f.keeps(200, Duration::from_millis(10)));
        assert!(Filter::new(&[], Duration::ZERO).unwrap().keeps(200, Duration::ZERO));
        for bad in ["2xx", "599-500", "42", ""] {
            assert!(Filter::new(&[bad.into()], Duration::ZERO).is_err(), "{bad}");
        }
    }
}
