//! Keeps every wanted certificate present and fresh: one task per certificate, started and
//! stopped as routes come and go, each with its own schedule and backoff, so a failing name
//! never delays another one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{Account, CertificateIdentifier, NewAccount};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::client::AcmeHttp;
use super::import::{self, Candidate};
use super::order::{self, Failure, Issued, Reason};
use super::schedule::{self, Backoff};
use super::store::{Store, Stored};
use super::{AcmeConfig, ChallengeKind, Challenges, Dns01};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::state::{HostPattern, MeshState, StateHub, TlsWish};
use crate::tls::LoadedPair;

/// A task wakes at least this often, to refresh its days-left gauge and to notice a
/// certificate another agent sharing the store wrote.
const RECHECK: Duration = Duration::from_secs(60);
/// How often an agent that finds the lock held looks again.
const LOCK_POLL: Duration = Duration::from_millis(500);
/// Failures of one CA in a row (for one certificate) before the next CA is tried.
const SWITCH_CA_AFTER: u32 = 2;
/// One order attempt (both challenge kinds included) is given up after this long.
const ORDER_DEADLINE: Duration = Duration::from_secs(300);

/// What the manager knows of one certificate it keeps, for the inventory (`/api/state`).
#[derive(Clone, Debug, Default)]
pub struct Kept {
    pub names: Vec<String>,
    /// When it is due (unset until the first look at the store).
    pub next_renewal: Option<SystemTime>,
    /// The last failure, until an order succeeds.
    pub last_error: Option<String>,
}

/// Every certificate the manager keeps, by primary name.
pub type Inventory = Arc<std::sync::RwLock<BTreeMap<String, Kept>>>;

pub struct Manager {
    cfg: AcmeConfig,
    store: Arc<Store>,
    challenges: Arc<Challenges>,
    metrics: Arc<Metrics>,
    http: AcmeHttp,
    /// Tells the certificate directory watcher to reload now.
    reload: Arc<Notify>,
    /// Each CA's account credentials (JSON) by directory URL, once loaded or created.
    accounts: tokio::sync::Mutex<HashMap<String, String>>,
    /// Set once the CA answered that it has no renewal information (RFC 9773).
    no_ari: AtomicBool,
    /// DNS-01, where it can work: wildcards are ordered only then.
    dns01: Option<Dns01>,
    /// Certificates from `acme.import`, taken instead of an order where they cover the names.
    imports: Vec<Candidate>,
    inventory: Inventory,
    /// Where certificates whose orders keep failing are reported (`/readyz`'s `acme`
    /// component, still ready), with the component's own detail.
    readiness: Option<(Arc<Readiness>, String)>,
    /// Names obtained on demand (kept renewed), and a wake-up for the task list.
    on_demand: std::sync::RwLock<std::collections::BTreeSet<String>>,
    on_demand_added: Notify,
}

impl Manager {
    pub fn new(
        cfg: AcmeConfig,
        store: Arc<Store>,
        challenges: Arc<Challenges>,
        metrics: Arc<Metrics>,
        reload: Arc<Notify>,
        dns01: Option<Dns01>,
    ) -> Result<Self, super::RootsError> {
        let http = AcmeHttp::new(cfg.trust_roots.as_deref(), cfg.request_timeout)?;
        challenges.share_through(store.challenges_dir());
        let on_demand = std::sync::RwLock::new(store.on_demand_names());
        let (imports, problems) = import::load(&cfg.import);
        for problem in problems {
            tracing::warn!("acme: not imported: {problem}");
        }
        if !cfg.import.is_empty() {
            tracing::info!(
                certificates = imports.len(),
                "acme: certificates to take over instead of ordering"
            );
        }
        Ok(Self {
            cfg,
            store,
            challenges,
            metrics,
            http,
            reload,
            accounts: tokio::sync::Mutex::default(),
            no_ari: AtomicBool::new(false),
            dns01,
            imports,
            inventory: Inventory::default(),
            readiness: None,
            on_demand,
            on_demand_added: Notify::new(),
        })
    }

    /// Reports certificates overdue with failing orders in `readiness`'s `acme` component,
    /// after `detail`.
    #[must_use]
    pub fn reporting_to(mut self, readiness: Arc<Readiness>, detail: String) -> Self {
        self.readiness = Some((readiness, detail));
        self
    }

    /// The certificates kept, as they change.
    #[must_use]
    pub fn inventory(&self) -> Inventory {
        self.inventory.clone()
    }

    fn note(&self, primary: &str, names: &[String], change: impl FnOnce(&mut Kept)) {
        let mut inventory = self.inventory.write().expect("inventory lock");
        let kept = inventory.entry(primary.to_owned()).or_default();
        names.clone_into(&mut kept.names);
        change(kept);
        self.report(&inventory);
    }

    /// An alert before expiry, never a surprise: certificates past their renewal time whose
    /// last order failed are named in `/readyz` (the node stays ready: it serves the old
    /// certificate, or the fallback).
    fn report(&self, inventory: &BTreeMap<String, Kept>) {
        let Some((readiness, detail)) = &self.readiness else { return };
        let now = SystemTime::now();
        let failing: Vec<String> = inventory
            .iter()
            .filter(|(_, k)| k.next_renewal.is_some_and(|due| due <= now))
            .filter_map(|(primary, k)| {
                let error = k.last_error.as_deref()?;
                Some(format!("{primary} ({})", error.chars().take(160).collect::<String>()))
            })
            .collect();
        if failing.is_empty() {
            readiness.set("acme", true, detail);
        } else {
            readiness.set("acme", true, format!("{detail}; overdue, orders failing: {}", failing.join("; ")));
        }
    }

    /// Follows the state: starts a task for each newly wanted certificate, stops the task of
    /// one no longer wanted (an order in flight is abandoned; its lock is released). While
    /// `issuer` is false (another agent of the cluster orders), nothing runs.
    pub async fn run(self: Arc<Self>, hub: Arc<StateHub>, mut issuer: tokio::sync::watch::Receiver<bool>) {
        let mut changes = hub.subscribe();
        let mut running: HashMap<String, (Vec<String>, JoinHandle<()>)> = HashMap::new();
        loop {
            let ordering = *issuer.borrow_and_update();
            let wanted = if ordering {
                let mut wanted =
                    wanted_certificates(&hub.load().state, self.cfg.max_names, self.dns01.is_some());
                // Names obtained on demand, renewed as long as no route claims them.
                let claimed: HashSet<String> = wanted.values().flatten().cloned().collect();
                for name in self.on_demand.read().expect("on-demand lock").iter() {
                    if !claimed.contains(name) {
                        wanted.insert(name.clone(), vec![name.clone()]);
                    }
                }
                wanted
            } else {
                BTreeMap::new()
            };
            running.retain(|primary, (names, task)| {
                let keep = wanted.get(primary) == Some(names);
                if !keep {
                    task.abort();
                    let mut inventory = self.inventory.write().expect("inventory lock");
                    inventory.remove(primary.as_str());
                    self.report(&inventory);
                    self.metrics.acme_days_left.remove_label_values(&[primary.as_str()]).ok();
                    if ordering {
                        tracing::info!(certificate = %primary, "acme: no longer wanted as it was; its task stopped");
                    } else {
                        tracing::info!(certificate = %primary, "acme: another agent of the cluster orders it now; its task stopped");
                    }
                }
                keep
            });
            for (primary, names) in wanted {
                if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(primary) {
                    let task = tokio::spawn(self.clone().keep(slot.key().clone(), names.clone()));
                    slot.insert((names, task));
                }
            }
            // A closed `issuer` channel means the role can no longer change (standalone).
            let role_change = async {
                if issuer.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                () = role_change => {}
                () = self.on_demand_added.notified() => {}
            }
        }
        for (_, (_, task)) in running {
            task.abort();
        }
    }

    /// Keeps one certificate: orders it when missing or not covering its names, renews it
    /// when due, backs off after failures while the old certificate stays served.
    async fn keep(self: Arc<Self>, primary: String, names: Vec<String>) {
        let mut backoff = Backoff::new(self.cfg.retry_base, self.cfg.retry_max);
        let mut last_failure: Option<Reason> = None;
        let jitter = fastrand::f64();
        let mut ari: Option<(SystemTime, SystemTime)> = None;
        let cas = self.cfg.directory_urls();
        // The CA this certificate is ordered from, and its failures in a row.
        let (mut ca, mut ca_failures) = (0, 0);
        loop {
            let current = self.current(&primary, &names).or_else(|| self.take_over(&primary, &names, jitter));
            let now = SystemTime::now();
            if let Some(pair) = &current {
                self.metrics
                    .acme_days_left
                    .with_label_values(&[&primary])
                    .set(pair.info.remaining(now).as_secs_f64() / 86400.0);
            }
            let due = match &current {
                Some(pair) => self.due(pair, jitter, &mut ari).await,
                None => now,
            };
            self.note(&primary, &names, |k| k.next_renewal = Some(due));
            if let Ok(wait) = due.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait.min(RECHECK)).await;
                continue;
            }
            let lock = match self.store.try_lock(&primary) {
                Ok(Some(lock)) => lock,
                Ok(None) => {
                    tracing::debug!(certificate = %primary, "acme: another agent is ordering this certificate; waiting for its result");
                    tokio::time::sleep(LOCK_POLL).await;
                    continue;
                }
                Err(e) => {
                    self.failed(
                        &primary,
                        &names,
                        Failure::new(Reason::Storage, format!("cannot take the lock: {e}")),
                        &mut backoff,
                        &mut last_failure,
                        current.is_some(),
                    )
                    .await;
                    continue;
                }
            };
            // While this agent waited for the lock, another may have renewed it.
            if let Some(fresh) = self.current(&primary, &names) {
                if current.as_ref().is_none_or(|c| fresh.info.not_after > c.info.not_after) {
                    continue;
                }
            }
            let started = Instant::now();
            let result = self.issue(&names, &cas[ca]).await.and_then(|issued| {
                self.store
                    .write_cert(&primary, &issued.chain_pem, &issued.key_pem)
                    .map_err(|e| Failure::new(Reason::Storage, format!("cannot write the certificate: {e}")))
            });
            drop(lock);
            match result {
                Ok(()) => {
                    // The next renewal starts with the preferred CA again.
                    (ca, ca_failures) = (0, 0);
                    self.note(&primary, &names, |k| k.last_error = None);
                    self.reload.notify_one();
                    self.metrics.acme_issued.with_label_values(&[&primary]).inc();
                    backoff.succeeded();
                    last_failure = None;
                    ari = None;
                    let what = if current.is_some() { "renewed" } else { "issued" };
                    tracing::info!(certificate = %primary, names = %names.join(","), took_ms = started.elapsed().as_millis() as u64, "acme: certificate {what}");
                }
                Err(failure) => {
                    if failure.reason.is_the_cas() {
                        ca_failures += 1;
                        if ca_failures >= SWITCH_CA_AFTER && cas.len() > 1 {
                            let next = (ca + 1) % cas.len();
                            tracing::warn!(certificate = %primary, failing = %cas[ca], next = %cas[next], "acme: the CA keeps failing for this certificate ({}); trying the next one", failure.reason.label());
                            (ca, ca_failures) = (next, 0);
                        }
                    }
                    self.failed(
                        &primary,
                        &names,
                        failure,
                        &mut backoff,
                        &mut last_failure,
                        current.is_some(),
                    )
                    .await;
                }
            }
        }
    }

    /// The stored certificate for `primary` if it covers `names`; a corrupt one is set aside.
    fn current(&self, primary: &str, names: &[String]) -> Option<LoadedPair> {
        match self.store.load_cert(primary) {
            Stored::Usable(pair) if pair.info.covers(names) => Some(pair),
            Stored::Usable(_) | Stored::Missing => None,
            Stored::Corrupt(why) => {
                let moved = self.store.set_aside_cert(primary);
                let moved: Vec<String> = moved.iter().map(|p| p.display().to_string()).collect();
                tracing::warn!(certificate = %primary, moved_to = %moved.join(","), "acme: stored certificate is unusable ({why}); set aside, ordering a new one");
                None
            }
        }
    }

    /// A certificate for `name` ordered now (at its first handshake), stored, and kept renewed
    /// from then on.
    pub async fn obtain_on_demand(&self, name: &str) -> Result<(), String> {
        let names = vec![name.to_owned()];
        // Stored already (an earlier order, another agent sharing the store): served as it is.
        if self.current(name, &names).is_none() {
            let lock = self.store.try_lock(name).map_err(|e| e.to_string())?;
            let issued = self.issue(&names, self.cfg.directory_url()).await;
            drop(lock);
            let issued = issued.map_err(|f| {
                self.metrics.acme_failures.with_label_values(&[name, f.reason.label()]).inc();
                f.to_string()
            })?;
            self.store
                .write_cert(name, &issued.chain_pem, &issued.key_pem)
                .map_err(|e| format!("cannot write the certificate: {e}"))?;
            self.metrics.acme_issued.with_label_values(&[name]).inc();
            tracing::info!(certificate = %name, "acme: certificate issued on demand");
        }
        if let Err(e) = self.store.add_on_demand(name) {
            tracing::warn!(certificate = %name, "acme: the on-demand name is not stored (it will not be renewed after a restart): {e}");
        }
        self.on_demand.write().expect("on-demand lock").insert(name.to_owned());
        self.on_demand_added.notify_one();
        self.reload.notify_one();
        Ok(())
    }

    /// An imported certificate for `names` put in the store in place of a new order.
    fn take_over(&self, primary: &str, names: &[String], jitter: f64) -> Option<LoadedPair> {
        let due = |pair: &LoadedPair| {
            schedule::renewal_time(pair.info.not_before, pair.info.not_after, self.cfg.renew_before, jitter)
        };
        let found = import::best(&self.imports, names, due)?;
        if let Err(e) = self.store.write_cert(primary, &found.chain_pem, &found.key_pem) {
            tracing::warn!(certificate = %primary, "acme: cannot store the certificate from {}: {e}", found.from);
            return None;
        }
        self.reload.notify_one();
        tracing::info!(certificate = %primary, names = %names.join(","), from = %found.from, "acme: certificate taken over, no order");
        Some(found.pair.clone())
    }

    /// Counts, logs (once per reason in a row) and waits out a failure.
    async fn failed(
        &self,
        primary: &str,
        names: &[String],
        failure: Failure,
        backoff: &mut Backoff,
        last: &mut Option<Reason>,
        serving: bool,
    ) {
        self.metrics.acme_failures.with_label_values(&[primary, failure.reason.label()]).inc();
        self.note(primary, names, |k| k.last_error = Some(failure.to_string()));
        let wait = backoff.failed(failure.retry_after, SystemTime::now());
        let serving = if serving {
            "the current certificate stays served"
        } else {
            "the fallback certificate is served meanwhile"
        };
        if *last == Some(failure.reason) {
            tracing::debug!(certificate = %primary, reason = failure.reason.label(), retry_in = ?wait, "acme: still failing: {}", failure.detail);
        } else {
            tracing::warn!(certificate = %primary, names = %names.join(","), reason = failure.reason.label(), retry_in = ?wait,
                "acme: cannot get a certificate: {}; {serving}", failure.detail);
        }
        *last = Some(failure.reason);
        tokio::time::sleep(wait).await;
    }

    /// When `pair` is due: `acme.renew_before` if set, else the CA's renewal window (RFC
    /// 9773) if it offers one, else two thirds of the lifetime.
    async fn due(
        &self,
        pair: &LoadedPair,
        jitter: f64,
        ari: &mut Option<(SystemTime, SystemTime)>,
    ) -> SystemTime {
        let standard =
            schedule::renewal_time(pair.info.not_before, pair.info.not_after, self.cfg.renew_before, jitter);
        if self.cfg.renew_before.is_some() || self.no_ari.load(Ordering::Relaxed) {
            return standard;
        }
        let now = SystemTime::now();
        if let Some((due, recheck)) = *ari {
            if now < recheck {
                return due;
            }
        }
        match self.renewal_info(pair, jitter).await {
            Ok((due, recheck)) => {
                *ari = Some((due, recheck));
                due
            }
            Err(None) => {
                self.no_ari.store(true, Ordering::Relaxed);
                standard
            }
            Err(Some(e)) => {
                tracing::debug!(
                    "acme: renewal information unavailable ({e}); using two thirds of the lifetime"
                );
                *ari = Some((standard, now + RECHECK * 10));
                standard
            }
        }
    }

    /// The CA's suggested renewal time and when to ask again. `Err(None)`: not supported.
    async fn renewal_info(
        &self,
        pair: &LoadedPair,
        jitter: f64,
    ) -> Result<(SystemTime, SystemTime), Option<String>> {
        let id = CertificateIdentifier::try_from(&pair.key.cert[0]).map_err(Some)?;
        let account = self
            .account(self.http.for_order(), self.cfg.directory_url())
            .await
            .map_err(|f| Some(f.to_string()))?;
        match account.renewal_info(&id).await {
            Ok((info, ask_again)) => {
                let at = |unix: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
                let window = &info.suggested_window;
                let due = schedule::in_window(
                    at(window.start.unix_timestamp()),
                    at(window.end.unix_timestamp()),
                    jitter,
                );
                Ok((due, SystemTime::now() + ask_again.clamp(RECHECK, Duration::from_secs(86400))))
            }
            Err(instant_acme::Error::Unsupported(_)) => Err(None),
            Err(e) => Err(Some(e.to_string())),
        }
    }

    /// One order for `names` from the CA at `directory`: the configured challenge, then (if
    /// allowed) the other one. An account the CA no longer knows is replaced, once.
    async fn issue(&self, names: &[String], directory: &str) -> Result<Issued, Failure> {
        match self.issue_with_account(names, directory).await {
            Err(f) if f.reason == Reason::AccountUnknown => {
                tracing::warn!(
                    %directory,
                    "acme: the CA does not know the stored account ({}); creating a new one",
                    f.detail
                );
                self.forget_account(directory).await;
                self.issue_with_account(names, directory).await
            }
            other => other,
        }
    }

    async fn forget_account(&self, directory: &str) {
        let mut accounts = self.accounts.lock().await;
        if let Some(moved) = self.store.set_aside_account(directory) {
            tracing::info!(moved_to = %moved.display(), "acme: stored account set aside");
        }
        accounts.remove(directory);
    }

    async fn issue_with_account(&self, names: &[String], directory: &str) -> Result<Issued, Failure> {
        let http = self.http.for_order();
        let attempt = async {
            let account = self.account(http.clone(), directory).await?;
            let dns01 = self.dns01.as_ref();
            // Only DNS-01 proves a wildcard: no fallback for those.
            let wildcard = names.iter().any(|n| n.starts_with("*."));
            let first = if wildcard { ChallengeKind::Dns01 } else { self.cfg.challenge };
            match order::order(&account, names, first, &self.challenges, dns01).await {
                Err(f) if f.reason == Reason::ChallengeFailed && self.cfg.fallback && !wildcard => {
                    tracing::info!(names = %names.join(","), "acme: {} failed ({}); trying {}", first.label(), f.detail, first.other().label());
                    order::order(&account, names, first.other(), &self.challenges, dns01).await
                }
                other => other,
            }
        };
        let result = tokio::time::timeout(ORDER_DEADLINE, attempt).await.unwrap_or_else(|_| {
            Err(Failure::new(Reason::CaUnreachable, format!("the order took longer than {ORDER_DEADLINE:?}")))
        });
        result.map_err(|mut f| {
            f.retry_after = f.retry_after.or(http.retry_after());
            f
        })
    }

    /// The account at the CA of `directory`: loaded from the store, else created once (under a
    /// lock, so agents sharing the store create one account between them) and stored.
    async fn account(&self, http: AcmeHttp, directory: &str) -> Result<Account, Failure> {
        let url = directory.to_owned();
        let mut accounts = self.accounts.lock().await;
        loop {
            if !accounts.contains_key(&url) {
                match self.store.load_account(&url) {
                    Ok(Some(creds)) => {
                        accounts.insert(
                            url.clone(),
                            serde_json::to_string(&creds).expect("credentials serialize"),
                        );
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("acme: {e}"),
                }
            }
            if let Some(json) = accounts.get(&url) {
                let creds = serde_json::from_str(json).expect("credentials round-trip");
                return Account::builder_with_http(Box::new(http))
                    .from_credentials(creds)
                    .await
                    .map_err(|e| Failure::from_acme(&e));
            }
            match self.store.try_lock("account") {
                Ok(Some(_lock)) => {
                    if self.store.load_account(&url).ok().flatten().is_some() {
                        continue;
                    }
                    let contact = self.cfg.email.as_ref().map(|e| format!("mailto:{e}"));
                    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                    // External account binding is the first CA's (the one that asked for it).
                    let eab = if url == self.cfg.directory_url() {
                        self.cfg
                            .external_account()
                            .map_err(|e| Failure::new(Reason::CaError, e.to_string()))?
                    } else {
                        None
                    };
                    let new = NewAccount {
                        contact: &contacts,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    };
                    let (account, creds) = Account::builder_with_http(Box::new(http))
                        .create(&new, url.clone(), eab.as_ref())
                        .await
                        .map_err(|e| Failure::from_acme(&e))?;
                    self.store.save_account(&url, &creds).map_err(|e| {
                        Failure::new(Reason::Storage, format!("cannot store the new account: {e}"))
                    })?;
                    tracing::info!(directory = %url, account = %account.id(), "acme: account created and stored");
                    accounts
                        .insert(url.clone(), serde_json::to_string(&creds).expect("credentials serialize"));
                    return Ok(account);
                }
                Ok(None) => tokio::time::sleep(LOCK_POLL).await,
                Err(e) => {
                    return Err(Failure::new(Reason::Storage, format!("cannot take the account lock: {e}")))
                }
            }
        }
    }
}

/// The certificates the state asks for, by primary name (the first exact host, the file's
/// name): per service, the host names of its routes that want ACME, in order, at most
/// `max_names` per certificate. A name claimed by an earlier service is not ordered twice.
/// Wildcards (`*.example.com`) are ordered when `wildcards` (DNS-01 is available), and an
/// exact name that a wanted wildcard covers is not ordered again; without DNS-01 they are
/// left out (regexes and `name.*` patterns always are: no certificate names them).
#[must_use]
pub fn wanted_certificates(
    state: &MeshState,
    max_names: usize,
    wildcards: bool,
) -> BTreeMap<String, Vec<String>> {
    let wanted = |svc: &crate::state::Service| -> Vec<String> {
        let mut names = Vec::new();
        for route in &svc.http {
            let TlsWish::Acme { names: named, .. } = &route.tls else { continue };
            // The names asked for (LETSENCRYPT_HOST), else the route's hosts.
            if let Some(named) = named {
                names.extend(named.iter().cloned());
                continue;
            }
            for host in &route.hosts {
                match host {
                    HostPattern::Exact(h) => names.push(h.clone()),
                    HostPattern::Suffix(base) => names.push(format!("*{base}")),
                    other => {
                        tracing::debug!(service = %svc.name, host = %other, "acme: no certificate can name this pattern");
                    }
                }
            }
        }
        names
    };
    let wildcard_bases: HashSet<String> = if wildcards {
        state
            .services
            .iter()
            .flat_map(|s| wanted(s))
            .filter_map(|n| n.strip_prefix("*.").map(str::to_owned))
            .collect()
    } else {
        HashSet::new()
    };
    let covered =
        |name: &str| name.split_once('.').is_some_and(|(_, parent)| wildcard_bases.contains(parent));
    let mut claimed = HashSet::new();
    let mut out = BTreeMap::new();
    for svc in &state.services {
        let mut names = Vec::new();
        for name in wanted(svc) {
            let wildcard = name.starts_with("*.");
            if wildcard && !wildcards {
                tracing::debug!(service = %svc.name, host = %name, "acme: a wildcard needs DNS-01 (dns.listen, or acme.dns_provider = rfc2136): not ordered");
            } else if (wildcard || !covered(&name)) && claimed.insert(name.clone()) {
                names.push(name);
            }
        }
        for chunk in names.chunks(max_names.max(1)) {
            out.insert(primary(chunk), chunk.to_vec());
        }
    }
    out
}

/// The name a certificate is stored and known by: its first exact name, else
/// `_wildcard.<base>` (no file is named with a `*`).
fn primary(names: &[String]) -> String {
    names.iter().find(|n| !n.starts_with("*.")).cloned().unwrap_or_else(|| {
        let first = &names[0];
        format!("_wildcard.{}", first.strip_prefix("*.").unwrap_or(first))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{HttpRoute, Service};

    fn svc(name: &str, hosts: &[&str], acme: bool) -> Service {
        Service {
            name: name.into(),
            stack: None,
            provider: "t".into(),
            tasks: vec![],
            http: vec![HttpRoute {
                tls: if acme { TlsWish::Acme { email: None, names: None } } else { TlsWish::None },
                ..HttpRoute::new(
                    hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect(),
                    "/".into(),
                    80,
                )
            }],
            l4: vec![],
        }
    }

    /// Drop-in issue: LETSENCRYPT_HOST names the certificate's names exactly, not every host
    /// of the service.
    #[test]
    fn the_names_asked_for_are_the_certificates_names() {
        let mut web = svc("web", &["a.test", "b.test"], true);
        web.http[0].tls = TlsWish::Acme { email: None, names: Some(vec!["b.test".into()]) };
        let wanted = wanted_certificates(&MeshState::of_services([web]), 100, false);
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            [("b.test".to_owned(), vec!["b.test".to_owned()])]
        );
    }

    #[test]
    fn one_certificate_per_service_exact_names_only_no_name_twice() {
        let state = MeshState::of_services([
            svc("web", &["a.test", "www.a.test", "*.a.test"], true),
            svc("api", &["api.test", "a.test"], true),
            svc("plain", &["plain.test"], false),
        ]);
        let wanted = wanted_certificates(&state, 100, false);
        assert_eq!(wanted.len(), 2);
        assert_eq!(wanted["a.test"], ["a.test", "www.a.test"], "without DNS-01, no wildcard");
        assert_eq!(wanted["api.test"], ["api.test"]);
        let split =
            wanted_certificates(&MeshState::of_services([svc("w", &["a.t", "b.t", "c.t"], true)]), 2, false);
        assert_eq!(
            split.into_iter().collect::<Vec<_>>(),
            [
                ("a.t".to_owned(), vec!["a.t".to_owned(), "b.t".to_owned()]),
                ("c.t".to_owned(), vec!["c.t".to_owned()])
            ]
        );
    }

    /// Certificates issue: a wildcard certificate covers the routes it matches, and no
    /// second certificate is ordered for them.
    #[test]
    fn with_dns01_a_wildcard_is_ordered_and_the_names_it_covers_are_not() {
        let state = MeshState::of_services([
            svc("web", &["a.test", "www.a.test", "*.a.test"], true),
            svc("api", &["api.a.test", "deep.api.a.test"], true),
            svc("wild", &["*.b.test"], true),
        ]);
        let wanted = wanted_certificates(&state, 100, true);
        assert_eq!(wanted["a.test"], ["a.test", "*.a.test"]);
        assert_eq!(wanted["deep.api.a.test"], ["deep.api.a.test"], "a wildcard covers one label only");
        assert_eq!(wanted["_wildcard.b.test"], ["*.b.test"], "no file named with a star");
        assert_eq!(wanted.len(), 3, "{wanted:?}");
    }
}
