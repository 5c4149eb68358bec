//! Hops between agents. A Docker task's address is reachable only on its own node (an
//! overlay from inside the overlay, a bridge from its host), so an agent that routes a
//! request to a task on another node asks that node's agent to open the connection: one
//! mutual-TLS stream (the cluster credential) per upstream connection, then bytes both ways.
//!
//! The request is one line, `meshgate-hop 1 <task id> <port>\n`; the answer `ok\n` or
//! `refused <why>\n`. An agent dials only tasks its own engine says run on its node, at the
//! address it reaches them on: a hop cannot be used to reach anything else.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{client, TlsAcceptor, TlsConnector};

use super::identity::Identity;
use crate::state::{StateHub, COMPLETE_PATIENCE};

const MAGIC: &str = "meshgate-hop 1";
/// The longest request or answer line.
const MAX_LINE: u64 = 512;
/// A peer has this long to finish the TLS handshake and send its request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The task on this node must accept within this.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a hop could not be opened. Nothing of the request was sent: a retry is safe.
#[derive(Debug, thiserror::Error)]
pub enum HopError {
    #[error("cannot reach the agent of node {node}: {source}")]
    Connect { node: SocketAddr, source: std::io::Error },
    #[error("the agent of node {node} refused to reach task {task}: {why}")]
    Refused { node: SocketAddr, task: String, why: String },
}

/// Opens hops to other nodes' agents.
pub struct Dialer {
    tls: TlsConnector,
    port: u16,
}

/// A stream to a task through its node's agent.
pub type HopStream = client::TlsStream<TcpStream>;

impl Dialer {
    /// Connects to the agent of the node at `node` and asks it for `task`'s `port`.
    pub async fn dial(&self, node: IpAddr, task: &str, port: u16) -> Result<HopStream, HopError> {
        let addr = SocketAddr::new(node, self.port);
        let io = |source| HopError::Connect { node: addr, source };
        let tcp = TcpStream::connect(addr).await.map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        let name = rustls::pki_types::ServerName::IpAddress(node.into());
        let mut tls = self.tls.connect(name, tcp).await.map_err(io)?;
        tls.write_all(format!("{MAGIC} {task} {port}\n").as_bytes()).await.map_err(io)?;
        let answer = read_line(&mut tls).await.map_err(io)?;
        match answer.as_str() {
            "ok" => Ok(tls),
            other => Err(HopError::Refused {
                node: addr,
                task: task.to_owned(),
                why: other.strip_prefix("refused ").unwrap_or(other).to_owned(),
            }),
        }
    }
}

/// One line without its `\n`, at most [`MAX_LINE`] bytes, read byte by byte so nothing after
/// it is consumed.
async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut reader = BufReader::with_capacity(1, r.take(MAX_LINE));
    reader.read_until(b'\n', &mut line).await?;
    if line.pop() != Some(b'\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "no complete line"));
    }
    String::from_utf8(line).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Binds the hop listener and makes the dialer, both with the cluster credential. The server
/// stops accepting when `shutdown` turns true and lets the hops it carries finish, for up to
/// `grace`: they carry other nodes' requests in flight.
pub fn start(
    listen: SocketAddr,
    identity: &Identity,
    hub: Arc<StateHub>,
    (shutdown, grace): (watch::Receiver<bool>, Duration),
) -> Result<(Arc<Dialer>, tokio::task::JoinHandle<()>), super::StartError> {
    let server = identity.server_config().map_err(super::StartError::Tls)?;
    let client = identity.client_config().map_err(super::StartError::Tls)?;
    let cannot = move |error| super::StartError::Listen {
        what: "hops from other nodes",
        key: "cluster.hop_listen",
        addr: listen,
        error,
    };
    let bound = crate::net::Bound::new(listen, true).map_err(cannot)?;
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server = tokio::spawn(async move {
        // Like the proxy's listeners, hops are taken only once this agent knows its node's
        // tasks: during an update the previous agent takes them meanwhile (a new agent would
        // refuse every task as not on this node).
        if tokio::time::timeout(COMPLETE_PATIENCE, hub.complete()).await.is_err() {
            tracing::warn!(waiting_for = %hub.pending().into_iter().collect::<Vec<_>>().join(","), "cluster: taking hops before every source answered");
        }
        match bound.listen() {
            Ok(listener) => {
                tracing::info!(addr = %listen, "cluster: other nodes reach this node's tasks through {listen}");
                serve(listener, acceptor, hub, shutdown, grace).await;
            }
            Err(e) => tracing::error!("cluster: {}", cannot(e)),
        }
    });
    Ok((Arc::new(Dialer { tls: TlsConnector::from(Arc::new(client)), port: listen.port() }), server))
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Arc<StateHub>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = crate::net::accept(&listener, "cluster hops") => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (acceptor, hub) = (acceptor.clone(), hub.clone());
        conns.spawn(async move {
            if let Err(e) = hop(stream, &acceptor, &hub).await {
                tracing::debug!(%peer, "cluster: hop ended: {e}");
            }
        });
    }
    drop(listener);
    let open = conns.len();
    if open > 0 {
        tracing::info!(open, "cluster: no new hops; letting the open ones finish");
    }
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
}

/// Serves one hop: who, then the task's connection, then bytes both ways.
async fn hop(stream: TcpStream, acceptor: &TlsAcceptor, hub: &StateHub) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = acceptor.accept(stream).await?;
        let line = read_line(&mut tls).await?;
        std::io::Result::Ok((tls, line))
    });
    let (mut tls, line) = opened.await.map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let target = match parse_request(&line) {
        Some((task, port)) => match hub.load().state.local_addresses.get(task) {
            Some(addr) => Ok(SocketAddr::new(*addr, port)),
            None => Err(format!("task {task} does not run on this node")),
        },
        None => Err("not a hop request".to_owned()),
    };
    let task = match target {
        Ok(addr) => match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(e)) => Err(format!("connect to {addr} failed: {e}")),
            Err(_) => Err(format!("connect to {addr} timed out")),
        },
        Err(why) => Err(why),
    };
    match task {
        Ok(mut tcp) => {
            tcp.set_nodelay(true)?;
            tls.write_all(b"ok\n").await?;
            tokio::io::copy_bidirectional(&mut tls, &mut tcp).await?;
            Ok(())
        }
        Err(why) => {
            tls.write_all(format!("refused {why}\n").as_bytes()).await?;
            tls.shutdown().await
        }
    }
}

fn parse_request(line: &str) -> Option<(&str, u16)> {
    let rest = line.strip_prefix(MAGIC)?.strip_prefix(' ')?;
    let (task, port) = rest.rsplit_once(' ')?;
    Some((task, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_garbage_does_not() {
        assert_eq!(parse_request("meshgate-hop 1 web.1.abc 8080"), Some(("web.1.abc", 8080)));
        assert_eq!(parse_request("meshgate-hop 1 web.1.abc"), None);
        assert_eq!(parse_request("meshgate-hop 2 web.1.abc 80"), None);
        assert_eq!(parse_request("GET / HTTP/1.1"), None);
        assert_eq!(parse_request("meshgate-hop 1 web 99999"), None);
    }
}
