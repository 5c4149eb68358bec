//! Active health checks (a route's [`HealthCheck`]): each checked task is asked its check
//! path every interval, through the same way requests reach it (directly or through its
//! node's agent); a task that fails is out of rotation until a check passes. Checks live as
//! long as a route table uses their endpoint (they hold it weakly) and as their route keeps
//! the same check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use http::{header, Request, Uri};

use super::body::UpstreamBody;
use super::endpoint::{Endpoint, Sender};
use crate::state::HealthCheck;

/// The checks running, by endpoint and check.
#[derive(Default)]
pub struct Checks(Mutex<HashMap<(usize, HealthCheck), Probe>>);

/// A running check, stopped when dropped.
struct Probe(tokio::task::JoinHandle<()>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Checks {
    /// Runs exactly the checks in `wanted` (endpoint, check, `Host` to send): new ones are
    /// started, those no table wants are stopped. Outside a runtime (unit tests), none.
    pub fn keep(&self, wanted: Vec<(Arc<Endpoint>, HealthCheck, String)>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let mut running = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = HashMap::with_capacity(wanted.len());
        for (endpoint, check, host) in wanted {
            let key = (Arc::as_ptr(&endpoint) as usize, check.clone());
            let probe = running
                .remove(&key)
                .unwrap_or_else(|| Probe(tokio::spawn(probe(Arc::downgrade(&endpoint), check, host))));
            next.insert(key, probe);
        }
        *running = next;
    }
}

async fn probe(endpoint: Weak<Endpoint>, check: HealthCheck, host: String) {
    loop {
        let Some(e) = endpoint.upgrade() else { return };
        let outcome = once(&e, &check, &host).await;
        e.set_check(outcome);
        drop(e);
        // A zero interval (a routes file's typo) must not spin.
        tokio::time::sleep(check.interval.max(std::time::Duration::from_millis(100))).await;
    }
}

/// One check: a GET of its path, answered within its timeout with the status it wants.
async fn once(e: &Endpoint, check: &HealthCheck, host: &str) -> Result<(), String> {
    let asking = async {
        let sender = e.checkout(check.timeout, None).await.map_err(|err| err.to_string())?;
        let answer = match sender {
            Sender::H1 { mut sender, .. } => {
                let req = Request::get(check.path.as_str())
                    .header(header::HOST, host)
                    .body(UpstreamBody::Empty)
                    .map_err(|err| err.to_string())?;
                sender.send_request(req).await
            }
            Sender::H2(mut sender) => {
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(host)
                    .path_and_query(check.path.as_str())
                    .build()
                    .map_err(|err| err.to_string())?;
                let req = Request::get(uri).body(UpstreamBody::Empty).map_err(|err| err.to_string())?;
                sender.send_request(req).await
            }
        };
        let status = answer.map_err(|err| err.to_string())?.status();
        let good = match check.status {
            Some(want) => status.as_u16() == want,
            None => status.is_success() || status.is_redirection(),
        };
        if good {
            Ok(())
        } else {
            Err(format!("{} answered {status}", check.path))
        }
    };
    tokio::time::timeout(check.timeout, asking)
        .await
        .map_err(|_| format!("{} not answered within {:?}", check.path, check.timeout))?
}
