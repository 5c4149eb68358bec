//! The PROXY protocol (v1 text and v2 binary, as HAProxy's `send-proxy` and
//! `send-proxy-v2` write it): a load balancer in front balancing TCP tells the client's
//! address in a header before the connection's first byte. Read only from the sources in
//! `proxy.proxy_protocol_networks` (from anyone else, a PROXY header is not a request and is
//! refused by the HTTP or TLS parser like any other garbage); from those, the header may be
//! absent (the balancer's own health checks), as Traefik's `proxyProtocol.trustedIPs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header (the spec's section 2.1).
const V1_MAX: usize = 107;
/// How long to wait for the rest of a header that came in parts (rare: one segment holds it).
const PARTIAL: Duration = Duration::from_millis(5);

/// The header a task that asks for the PROXY protocol gets before the request: the client
/// (`src`) and the address it connected to (`dst`); `None`: a connection of the proxy's
/// own (a health check), `LOCAL` in v2, `UNKNOWN` in v1.
#[must_use]
pub fn header(version: crate::state::ProxyProtocol, addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    // Both addresses of one family: an IPv4 one beside an IPv6 one is written mapped.
    let addrs = addrs.map(|(src, dst)| match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (src, dst),
        _ => (mapped(src), mapped(dst)),
    });
    match version {
        crate::state::ProxyProtocol::V1 => match addrs {
            None => b"PROXY UNKNOWN\r\n".to_vec(),
            Some((src, dst)) => {
                let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
                format!("PROXY {family} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port())
                    .into_bytes()
            }
        },
        crate::state::ProxyProtocol::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            match addrs {
                None => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
                Some((src, dst)) => {
                    let (family, mut body) = match (src.ip(), dst.ip()) {
                        (IpAddr::V4(s), IpAddr::V4(d)) => (0x11, [s.octets(), d.octets()].concat()),
                        (s, d) => (0x21, [v6(s).octets(), v6(d).octets()].concat()),
                    };
                    body.extend_from_slice(&src.port().to_be_bytes());
                    body.extend_from_slice(&dst.port().to_be_bytes());
                    out.extend_from_slice(&[0x21, family]);
                    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
                    out.extend_from_slice(&body);
                }
            }
            out
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn mapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(v6(addr.ip())), addr.port())
}

/// A header that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// Reads the PROXY header at the start of `stream`, if there is one: the client's address it
/// carries (`None`: no header, or one that names no client, `LOCAL`/`UNKNOWN`: the
/// connection's own address stands). Nothing past the header is consumed.
///
/// # Errors
/// A header that is malformed or does not arrive whole within `limit`.
pub async fn read_header(stream: &mut TcpStream, limit: Duration) -> Result<Option<SocketAddr>, HeaderError> {
    tokio::time::timeout(limit, read(stream)).await.map_err(|_| HeaderError::Timeout(limit))?
}

async fn read(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    let mut buf = [0u8; 232];
    // The first bytes decide: wait until there are enough to tell.
    let seen = loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(HeaderError::Malformed("the connection closed before its first byte"));
        }
        let could_be = |sig: &[u8]| buf[..n.min(sig.len())] == sig[..n.min(sig.len())];
        if !could_be(b"PROXY ") && !could_be(&V2_SIGNATURE) {
            return Ok(None);
        }
        if n >= V2_SIGNATURE.len() || (could_be(b"PROXY ") && n >= 6) {
            break n;
        }
        // Part of it came: peeking again at once would spin (the socket stays readable).
        tokio::time::sleep(PARTIAL).await;
    };
    if buf[..seen].starts_with(b"PROXY ") {
        v1(stream, &mut buf).await
    } else {
        v2(stream).await
    }
}

async fn v1(stream: &mut TcpStream, buf: &mut [u8; 232]) -> Result<Option<SocketAddr>, HeaderError> {
    let end = loop {
        let n = stream.peek(&mut buf[..V1_MAX]).await?;
        if let Some(at) = buf[..n].windows(2).position(|w| w == b"\r\n") {
            break at + 2;
        }
        if n >= V1_MAX {
            return Err(HeaderError::Malformed("a v1 header longer than 107 bytes"));
        }
        tokio::time::sleep(PARTIAL).await;
    };
    stream.read_exact(&mut buf[..end]).await?;
    let line = std::str::from_utf8(&buf[..end - 2]).map_err(|_| HeaderError::Malformed("not text"))?;
    parse_v1(line)
}

/// `PROXY TCP4 192.0.2.7 198.51.100.1 51000 443` (without its CRLF).
fn parse_v1(line: &str) -> Result<Option<SocketAddr>, HeaderError> {
    let mut fields = line.split(' ');
    let (Some("PROXY"), Some(family)) = (fields.next(), fields.next()) else {
        return Err(HeaderError::Malformed("not `PROXY <family> ...`"));
    };
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let parts: Vec<&str> = fields.collect();
    let [src, _dst, sport, _dport] = parts[..] else {
        return Err(HeaderError::Malformed("a v1 header names two addresses and two ports"));
    };
    let ip: IpAddr = src.parse().map_err(|_| HeaderError::Malformed("a bad source address"))?;
    let port: u16 = sport.parse().map_err(|_| HeaderError::Malformed("a bad source port"))?;
    match (family, ip) {
        ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(Some(SocketAddr::new(ip, port))),
        _ => Err(HeaderError::Malformed("the address does not match the family")),
    }
}

async fn v2(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).await?;
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest).await?;
    parse_v2(&head, &rest)
}

fn parse_v2(head: &[u8; 16], rest: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    if head[..12] != V2_SIGNATURE || head[12] >> 4 != 2 {
        return Err(HeaderError::Malformed("not a version 2 header"));
    }
    match head[12] & 0xf {
        0 => return Ok(None), // LOCAL: the balancer's own connection (a health check)
        1 => {}
        _ => return Err(HeaderError::Malformed("an unknown v2 command")),
    }
    let port = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
    match head[13] {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 if rest.len() >= 12 => {
            let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
            Ok(Some(SocketAddr::new(ip.into(), port(8))))
        }
        0x21 if rest.len() >= 36 => {
            let octets: [u8; 16] = rest[..16].try_into().expect("16 bytes");
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port(32))))
        }
        // UNSPEC, UDP, Unix sockets: no client address to use.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => Ok(None),
        _ => Err(HeaderError::Malformed("a v2 address block too short for its family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        assert_eq!(
            parse_v1("PROXY TCP4 192.0.2.7 198.51.100.1 51000 443").unwrap(),
            Some("192.0.2.7:51000".parse().unwrap())
        );
        assert_eq!(
            parse_v1("PROXY TCP6 2001:db8::7 2001:db8::1 51000 443").unwrap(),
            Some("[2001:db8::7]:51000".parse().unwrap())
        );
        assert_eq!(parse_v1("PROXY UNKNOWN").unwrap(), None);
        for bad in ["PROXY TCP4 192.0.2.7", "PROXY TCP4 2001:db8::7 ::1 1 2", "PROXY TCP4 a b c d", "HELLO"] {
            assert!(parse_v1(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v2_blocks() {
        let mut head = [0u8; 16];
        head[..12].copy_from_slice(&V2_SIGNATURE);
        head[12] = 0x21;
        head[13] = 0x11;
        let rest = [192, 0, 2, 7, 198, 51, 100, 1, 0xc7, 0x38, 1, 187];
        assert_eq!(parse_v2(&head, &rest).unwrap(), Some("192.0.2.7:51000".parse().unwrap()));
        head[12] = 0x20;
        assert_eq!(parse_v2(&head, &rest).unwrap(), None, "LOCAL");
        head[12] = 0x21;
        assert!(parse_v2(&head, &rest[..4]).is_err(), "too short");
        head[12] = 0x11;
        assert!(parse_v2(&head, &rest).is_err(), "version 1 in a v2 header");
    }

    #[test]
    fn fuzzed_headers_never_panic() {
        let mut rng = fastrand::Rng::with_seed(13);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let line: String = (0..len)
                .map(|_| {
                    rng.choice(b"PROXY TCP46UNKOW0123456789.: abcdef".iter()).map_or(' ', |b| char::from(*b))
                })
                .collect();
            let _ = parse_v1(&line);
            let mut head = [0u8; 16];
            head[..12].copy_from_slice(&V2_SIGNATURE);
            head[12] = rng.u8(..);
            head[13] = rng.u8(..);
            let rest: Vec<u8> = (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect();
            let _ = parse_v2(&head, &rest);
        }
    }
}
