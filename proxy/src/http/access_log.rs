//! The access log: one line per request (per upgraded connection, at its end), in NCSA
//! `common`/`combined`, nginx-proxy's `vhost` or JSON with Traefik's field names (the ones
//! log pipelines built for Traefik already parse; nginx has no standard JSON format).
//!
//! As nginx's `buffer=`: a request's line is made when it ends, on the request's own thread,
//! into a buffer of that thread's; a thread of the log's own writes the buffers out, full
//! ones as they come and the rest every `TICK`. The request path never waits for the file:
//! a full buffer goes through a bounded channel, and when that is full its lines are
//! counted as dropped (`meshgate_access_log_dropped_total`). Lines from two workers may
//! reach the file out of order by up to a `TICK`, as with nginx's workers.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::uri::PathAndQuery;
use http::{header, HeaderName, HeaderValue, Method, Request, Version};
use prometheus::IntCounter;

use crate::config::{AccessFormat, LogConfig};

/// A buffer of lines is handed to the writer once it holds this much (nginx's `buffer=64k`).
const BUFFER: usize = 64 * 1024;
/// Full buffers waiting for the writer at most (1 MiB, some 3,000 to 7,000 lines: a slow
/// disk's second or so at a few thousand requests a second); more are dropped.
const QUEUE: usize = 16;
/// How often the writer takes the lines of buffers that are not full (nginx's `flush=`):
/// a line is in its file at most about this late.
const TICK: Duration = Duration::from_millis(50);

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

/// The log's front: filters, makes lines into the buffers, counts what it had to drop.
pub struct AccessLog {
    format: AccessFormat,
    buffers: Arc<Buffers>,
    queue: SyncSender<Lines>,
    filter: Filter,
    headers: Vec<HeaderName>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
}

/// Lines made and not yet written.
#[derive(Default)]
struct Lines {
    text: String,
    count: u64,
}

/// One buffer per worker thread (by the thread's turn of arrival, wrapping), each behind a
/// lock that only the writer's tick ever contends for.
struct Buffers(Box<[Mutex<Lines>]>);

impl Buffers {
    fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(4, std::num::NonZero::get).clamp(1, 64);
        Self((0..n).map(|_| Mutex::new(Lines::default())).collect())
    }

    /// The buffer of the calling thread.
    fn mine(&self) -> &Mutex<Lines> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static TURN: usize = NEXT.fetch_add(1, Ordering::Relaxed));
        &self.0[TURN.with(|t| *t) % self.0.len()]
    }
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
        let (queue, full) = std::sync::mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let buffers = Arc::new(Buffers::new());
        let writer = Writer { sink, out, reopen: reopen.clone(), buffers: buffers.clone() };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(&full))
            .map_err(|e| StartError::Open("(a thread for it)".into(), e))?;
        Ok(Some(Arc::new(Self {
            format: config.access_format,
            buffers,
            queue,
            filter,
            headers,
            reopen,
            dropped,
        })))
    }

    /// Reopens the log file before the next line (SIGUSR1, after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// What is known of a request when its head arrives.
    #[must_use]
    pub fn begin<B>(self: &Arc<Self>, req: &Request<B>, client: SocketAddr, secure: bool) -> Pending {
        // Header values and the path are copied, not kept as hyper's shared bytes: a record
        // waiting in the queue would pin the connection's read buffer, and hyper would then
        // allocate a new one for every read (seen as 3 µs more CPU per request and 20 MiB
        // more memory with the log on). The writer's thread makes text of them.
        let h = req.headers();
        let host = h
            .get(header::HOST)
            .map(owned)
            .or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        Pending {
            log: self.clone(),
            record: Box::new(Record {
                start: SystemTime::now(),
                started: Instant::now(),
                took: Duration::ZERO,
                client,
                secure,
                method: req.method().clone(),
                target: req
                    .uri()
                    .path_and_query()
                    .and_then(|p| {
                        PathAndQuery::from_maybe_shared(bytes::Bytes::copy_from_slice(p.as_str().as_bytes()))
                            .ok()
                    })
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
                host,
                version: req.version(),
                request_bytes: super::body::declared_length(h).unwrap_or(0),
                referer: h.get(header::REFERER).map(owned),
                user_agent: h.get(header::USER_AGENT).map(owned),
                headers: self.headers.iter().filter_map(|n| Some((n.clone(), owned(h.get(n)?)))).collect(),
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
        if record.status == 0 {
            // No answer was started: the client went away first (nginx and Traefik: 499).
            record.status = 499;
        }
        if !self.filter.keeps(record.status, record.took) {
            return;
        }
        let full = {
            let mut lines = self.buffers.mine().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            format_line(self.format, &record, &mut lines.text);
            lines.count += 1;
            if lines.text.len() < BUFFER {
                return;
            }
            std::mem::replace(&mut *lines, Lines { text: String::with_capacity(BUFFER + 1024), count: 0 })
        };
        if let Err(TrySendError::Full(lost) | TrySendError::Disconnected(lost)) = self.queue.try_send(full) {
            self.dropped.inc_by(lost.count);
        }
    }
}

/// A header value in bytes of its own (see `AccessLog::begin`).
fn owned(value: &HeaderValue) -> HeaderValue {
    HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn redacted<'a>(name: &HeaderName, value: &'a HeaderValue) -> std::borrow::Cow<'a, str> {
    if SECRET.contains(name) {
        "REDACTED".into()
    } else {
        text(value)
    }
}

fn text(value: &HeaderValue) -> std::borrow::Cow<'_, str> {
    // Most values are ASCII: checked at once, without the lossy decoder's chunking.
    match value.to_str() {
        Ok(ascii) => ascii.into(),
        Err(_) => String::from_utf8_lossy(value.as_bytes()),
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
    target: PathAndQuery,
    host: Option<HeaderValue>,
    version: Version,
    request_bytes: u64,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    headers: Vec<(HeaderName, HeaderValue)>,
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
    sink: Sink,
    out: Box<dyn std::io::Write + Send>,
    reopen: Arc<AtomicBool>,
    buffers: Arc<Buffers>,
}

fn open(sink: &Sink) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(match sink {
        Sink::Stdout => Box::new(std::io::stdout()),
        Sink::Stderr => Box::new(std::io::stderr()),
        Sink::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
    })
}

impl Writer {
    /// Writes full buffers as they come and, every `TICK`, the lines of the others; when
    /// the front is gone, what is left, then ends.
    fn run(mut self, full: &Receiver<Lines>) {
        // Swapped with a worker's buffer at a tick: that buffer keeps its capacity.
        let mut spare = Lines { text: String::with_capacity(BUFFER + 1024), count: 0 };
        let mut next_tick = Instant::now() + TICK;
        loop {
            match full.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(lines) => self.write(lines.text.as_bytes()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.take_the_rest(&mut spare);
                    return;
                }
            }
            if Instant::now() >= next_tick {
                self.take_the_rest(&mut spare);
                next_tick = Instant::now() + TICK;
            }
        }
    }

    /// Writes the lines waiting in every worker's buffer.
    fn take_the_rest(&mut self, spare: &mut Lines) {
        let buffers = self.buffers.clone();
        for buffer in &buffers.0 {
            {
                let mut lines = buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if lines.text.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *lines, spare);
            }
            self.write(spare.text.as_bytes());
            spare.text.clear();
            spare.count = 0;
        }
    }

    fn write(&mut self, text: &[u8]) {
        if self.reopen.swap(false, Ordering::Relaxed) {
            match open(&self.sink) {
                Ok(out) => self.out = out,
                Err(e) => {
                    tracing::warn!(
                        "access log: cannot reopen {:?}: {e}; writing on to the old file",
                        self.sink
                    );
                }
            }
        }
        if let Err(e) = self.out.write_all(text).and_then(|()| self.out.flush()) {
            tracing::warn!("access log: cannot write: {e}");
        }
    }
}

fn format_line(format: AccessFormat, r: &Record, line: &mut String) {
    with_times(r.start, |rfc3339, clf| {
        if format == AccessFormat::Json {
            json_line(r, rfc3339, line);
        } else {
            text_line(format, r, clf, line);
        }
    });
}

fn text_line(format: AccessFormat, r: &Record, clf: &str, line: &mut String) {
    if format == AccessFormat::Vhost {
        let _ = write!(line, "{} ", or_dash(&r.host.as_ref().map(text).unwrap_or_default()));
    }
    let _ = write!(
        line,
        "{} - - [{clf}] \"{} {} {}\" {} {}",
        r.client.ip(),
        r.method,
        escaped(r.target.as_str()),
        protocol(r.version),
        r.status,
        r.bytes
    );
    if format != AccessFormat::Common {
        let _ = write!(
            line,
            " \"{}\" \"{}\"",
            escaped(&r.referer.as_ref().map_or("-".into(), text)),
            escaped(&r.user_agent.as_ref().map_or("-".into(), text))
        );
    }
    if format == AccessFormat::Vhost {
        let _ = write!(line, " \"{}\"", r.task.map_or_else(|| "-".to_owned(), |t| t.to_string()));
    }
    line.push('\n');
}

/// The date and time of a second, as both formats write them, made once per second and
/// thread (the date's formatting was a good part of a line's cost).
#[derive(Default)]
struct Stamp {
    second: Option<u64>,
    /// `2026-11-28T13:55:07`, then the fraction of the moment asked for.
    rfc3339: String,
    /// `28/Nov/2026:13:55:07 +0000`.
    clf: String,
}

thread_local!(static STAMP: RefCell<Stamp> = RefCell::default());

/// Calls `f` with `at` as RFC 3339 with nanoseconds (`2026-11-28T13:55:07.123456789Z`) and
/// as NCSA's time.
fn with_times(at: SystemTime, f: impl FnOnce(&str, &str)) {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    STAMP.with(|stamp| {
        let mut stamp = stamp.borrow_mut();
        let stamp = &mut *stamp;
        if stamp.second != Some(since.as_secs()) {
            let second = SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            let whole = humantime::format_rfc3339_seconds(second).to_string();
            stamp.clf = clf_time(&whole);
            whole.trim_end_matches('Z').clone_into(&mut stamp.rfc3339);
            stamp.second = Some(since.as_secs());
        }
        stamp.rfc3339.truncate("2026-11-28T13:55:07".len());
        // Nine digits always: those of 1,000,000,000 more, without the leading 1.
        let mut digits = itoa::Buffer::new();
        stamp.rfc3339.push('.');
        stamp.rfc3339.push_str(&digits.format(1_000_000_000 + since.subsec_nanos())[1..]);
        stamp.rfc3339.push('Z');
        f(&stamp.rfc3339, &stamp.clf);
    });
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

/// One JSON object, written field by field into `line` (fields in Traefik's order:
/// alphabetical, `request_*` headers, then `level`, `msg`, `time`). Strings are copied as
/// they are and numbers written by hand: this runs once per request on the writer's thread,
/// which shares a core with the requests (`format_args!` per field was most of its time).
fn json_line(r: &Record, rfc3339: &str, line: &mut String) {
    let path = r.target.path();
    let addr = r.host.as_ref().map(text).unwrap_or_default();
    let port = addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    let host = port.map_or(&*addr, |_| addr.rsplit_once(':').map_or("", |(h, _)| h));
    let client = r.client.to_string();
    let client_host = match r.client {
        SocketAddr::V4(_) => client.rsplit_once(':').map_or("", |(h, _)| h),
        SocketAddr::V6(_) => client.rsplit_once("]:").map_or("", |(h, _)| h.trim_start_matches('[')),
    };
    let task = r.task.map(|t| t.to_string());
    let mut j = Json(line);
    j.0.push('{');
    j.str("ClientAddr", &client);
    j.str("ClientHost", client_host);
    j.number_text("ClientPort", u64::from(r.client.port()));
    j.str("ClientUsername", "-");
    j.number("DownstreamContentSize", r.bytes);
    j.number("DownstreamStatus", u64::from(r.status));
    j.number("Duration", u64::try_from(r.took.as_nanos()).unwrap_or(u64::MAX));
    j.number("OriginContentSize", if r.origin_status == 0 { 0 } else { r.bytes });
    j.number("OriginStatus", u64::from(r.origin_status));
    j.str("RequestAddr", &addr);
    j.number("RequestContentSize", r.request_bytes);
    j.str("RequestHost", host);
    j.str("RequestMethod", r.method.as_str());
    j.str("RequestPath", r.target.as_str());
    match port {
        Some(p) => j.number_text("RequestPort", u64::from(p)),
        None => j.str("RequestPort", "-"),
    }
    j.str("RequestProtocol", protocol(r.version));
    j.str("RequestScheme", if r.secure { "https" } else { "http" });
    j.number("RetryAttempts", u64::from(r.attempts.saturating_sub(1)));
    if let Some(route) = &r.route {
        j.str("RouterName", &route.router);
    }
    if let Some(task) = &task {
        j.str("ServiceAddr", task);
    }
    if let Some(route) = &r.route {
        j.str("ServiceName", &route.service);
    }
    if let Some(task) = &task {
        j.key("ServiceURL");
        j.0.push_str("\"http://");
        j.raw(task);
        j.raw(path);
        j.0.push_str("\",");
    }
    j.str("StartUTC", rfc3339);
    j.str("entryPointName", if r.secure { "websecure" } else { "web" });
    if let Some(v) = &r.referer {
        j.str("request_Referer", &text(v));
    }
    if let Some(v) = &r.user_agent {
        j.str("request_User-Agent", &text(v));
    }
    for (name, value) in &r.headers {
        j.str(&format!("request_{}", title_case(name.as_str())), &redacted(name, value));
    }
    j.str("level", "info");
    j.str("msg", "");
    j.str("time", rfc3339);
    j.0.pop(); // the last comma
    j.0.push_str("}\n");
}

/// Writes JSON members into a line without building a value first (a request's line is
/// made on the writer's thread, often on the same core as the requests).
struct Json<'a>(&'a mut String);

impl Json<'_> {
    fn key(&mut self, key: &str) {
        self.0.push('"');
        self.0.push_str(key);
        self.0.push_str("\":");
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        push_u64(self.0, value);
        self.0.push(',');
    }

    /// A number written as a string (Traefik writes ports so).
    fn number_text(&mut self, key: &str, value: u64) {
        self.key(key);
        self.0.push('"');
        push_u64(self.0, value);
        self.0.push_str("\",");
    }

    /// A string member.
    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.0.push('"');
        self.raw(value);
        self.0.push_str("\",");
    }

    /// A string's content, escaped as JSON needs (quotes, backslashes, controls).
    fn raw(&mut self, value: &str) {
        if !value.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            self.0.push_str(value);
            return;
        }
        for c in value.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
    }
}

/// `value` in decimal, without the formatting machinery.
fn push_u64(out: &mut String, value: u64) {
    out.push_str(itoa::Buffer::new().format(value));
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
            target: PathAndQuery::from_static("/a%20b?q=1"),
            host: Some(HeaderValue::from_static("app.test:8080")),
            version: Version::HTTP_11,
            request_bytes: 0,
            referer: None,
            user_agent: Some(HeaderValue::from_static("curl/8 \"x\"")),
            headers: vec![(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"))],
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
            "203.0.113.7 - - [28/Nov/2026:13:55:07 +0000] \"GET /a%20b?q=1 HTTP/1.1\" 200 12 \"-\" \"curl/8 \\x22x\\x22\"\n"
        );
        line.clear();
        format_line(AccessFormat::Common, &record(), &mut line);
        assert!(line.ends_with("HTTP/1.1\" 200 12\n"), "{line}");
        line.clear();
        format_line(AccessFormat::Vhost, &record(), &mut line);
        assert!(line.starts_with("app.test:8080 203.0.113.7 - - ["), "{line}");
        assert!(line.ends_with("\"curl/8 \\x22x\\x22\" \"10.0.1.5:80\"\n"), "{line}");
    }

    #[test]
    fn times_are_humantimes_and_ncsas() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_874_107);
        for at in [
            base,
            base + Duration::from_nanos(5),
            base + Duration::from_nanos(999_999_999),
            base + Duration::from_secs(86_400 * 40) + Duration::from_nanos(120_000_000),
            base + Duration::from_nanos(7),
        ] {
            with_times(at, |rfc3339, clf| {
                assert_eq!(rfc3339, humantime::format_rfc3339_nanos(at).to_string());
                assert_eq!(clf, clf_time(rfc3339));
            });
        }
        with_times(base, |_, clf| assert_eq!(clf, "28/Nov/2026:13:55:07 +0000"));
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 1_234_567_890, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
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
        assert!(!line.contains("s3cret"));
        assert_eq!(v["request_User-Agent"], "curl/8 \"x\"");
        assert_eq!(v["RequestPath"], "/a%20b?q=1");
        assert_eq!(v["ServiceURL"], "http://10.0.1.5:80/a%20b");
        assert_eq!(v["StartUTC"], "2026-11-28T13:55:07.000000000Z");
        assert_eq!((&v["ClientAddr"], &v["ClientPort"]), (&"203.0.113.7:51000".into(), &"51000".into()));
        let v6 = Record { client: "[2001:db8::1]:443".parse().unwrap(), ..record() };
        line.clear();
        format_line(AccessFormat::Json, &v6, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (&v["ClientAddr"], &v["ClientHost"]),
            (&"[2001:db8::1]:443".into(), &"2001:db8::1".into())
        );
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
