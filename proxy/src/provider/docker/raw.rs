//! Plain GETs of the Engine API, for the fields bollard's models leave out (a task's
//! `NetworksAttachments`, which carry its overlay addresses on any manager).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("cannot reach the engine at {endpoint}: {source}")]
    Connect { endpoint: String, source: std::io::Error },
    #[error("the engine's answer to {path} could not be read: {0}", path = .1)]
    Http(hyper::Error, String),
    #[error("the engine answered {status} to {path}")]
    Status { status: http::StatusCode, path: String },
    #[error("the engine's answer to {path} is not the JSON expected: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error(
        "reading {path} needs a unix:// or plain tcp:// Docker endpoint; {endpoint} uses TLS (task addresses on other nodes are then unknown)"
    )]
    Unsupported { endpoint: String, path: String },
}

/// GETs `path` (e.g. `/v1.41/tasks`) from the engine at `endpoint` and parses the JSON body.
pub async fn get<T: serde::de::DeserializeOwned>(endpoint: &str, path: &str) -> Result<T, RawError> {
    let connect_err = |source| RawError::Connect { endpoint: endpoint.to_owned(), source };
    let tls = std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty() && v != "0");
    let body = if let Some(socket) = endpoint.strip_prefix("unix://") {
        exchange(tokio::net::UnixStream::connect(socket).await.map_err(connect_err)?, path).await?
    } else if let (Some(addr), false) = (endpoint.strip_prefix("tcp://"), tls) {
        exchange(tokio::net::TcpStream::connect(addr).await.map_err(connect_err)?, path).await?
    } else {
        return Err(RawError::Unsupported { endpoint: endpoint.to_owned(), path: path.to_owned() });
    };
    serde_json::from_slice(&body).map_err(|source| RawError::Json { path: path.to_owned(), source })
}

async fn exchange<S>(stream: S, path: &str) -> Result<Bytes, RawError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |e| RawError::Http(e, path.to_owned());
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
    tokio::spawn(conn);
    let req = http::Request::get(path).header(http::header::HOST, "docker").body(Empty::<Bytes>::new());
    let resp = sender.send_request(req.expect("a valid request")).await.map_err(http_err)?;
    if !resp.status().is_success() {
        return Err(RawError::Status { status: resp.status(), path: path.to_owned() });
    }
    Ok(resp.into_body().collect().await.map_err(http_err)?.to_bytes())
}
