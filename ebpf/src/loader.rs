//! Loads the BPF object, keeps its maps in step with a [`PortTable`], attaches the programs
//! to the uplink. Dropping a [`Mesh`] detaches everything (the programs are attached through
//! BPF links owned by this process, so a crashed agent leaves nothing behind either).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};

use crate::counters::{twin, CounterReader};
use crate::maglev;
use crate::maps::{
    BackendSlot, FlowKey, SvcInfo, SvcKey, BACKEND_DRAINING, BACKEND_LIVE, BACKEND_LOCAL, MAGLEV_SIZE,
    MAX_BACKENDS, MAX_SERVICES,
};
use crate::{PortTable, Protocol};

/// The compiled BPF object (empty when the build had no clang).
pub const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh.o"));

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("this build has no XDP mesh: clang was missing when it was built (install clang-19 and libbpf-dev, then rebuild)")]
    NotBuilt,
    #[error("cannot load the BPF programs: {0} (the agent needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with BTF)")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("BPF map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("BPF map {0}: cannot open another handle: {1}")]
    Handle(&'static str, std::io::Error),
    #[error("there is no network interface `{0}` (check mesh.uplink: `ip link` lists them)")]
    NoInterface(String),
    #[error("too many {0} for the BPF maps (at most {1})")]
    Full(&'static str, u32),
    #[error("cannot keep the reply table in {0}: {1} (mesh.pin_dir must be on a bpffs: mount one with `mount -t bpf bpf /sys/fs/bpf`, and mount that into the agent's container)")]
    Pin(std::path::PathBuf, String),
}

/// The reply table's pin, named by its layout (a version with another layout uses another
/// file) under a directory per network namespace (the addresses it holds mean something only
/// there).
fn replies_pin(dir: &std::path::Path) -> Result<std::path::PathBuf, MeshError> {
    use std::os::unix::fs::MetadataExt;
    let netns =
        std::fs::metadata("/proc/self/ns/net").map_err(|e| MeshError::Pin(dir.to_owned(), e.to_string()))?;
    let dir = dir.join(format!("net-{}", netns.ino()));
    std::fs::create_dir_all(&dir).map_err(|e| MeshError::Pin(dir.clone(), e.to_string()))?;
    Ok(dir.join(format!(
        "replies-{}-{}",
        std::mem::size_of::<FlowKey>(),
        std::mem::size_of::<crate::maps::ReplyVal>()
    )))
}

/// How the XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
}

/// The loaded mesh: programs, maps, and the ids and slots given out so far.
pub struct Mesh {
    ebpf: Ebpf,
    services: BpfHashMap<MapData, SvcKey, SvcInfo>,
    maglev: Array<MapData, u32>,
    backends: Array<MapData, BackendSlot>,
    local_addrs: BpfHashMap<MapData, u32, u32>,
    counters: CounterReader,
    ids: Allocator<(Protocol, u16)>,
    /// Keyed by node and address: every node has the same task subnet.
    slots: Allocator<(Ipv4Addr, SocketAddrV4)>,
    /// Each service's Maglev row as last written, to skip unchanged rows.
    rows: HashMap<u32, Vec<u32>>,
    /// The devices local tasks are reached through, with `meshgate_tc_reply` on their
    /// ingress: by name and ifindex (a device deleted and made again under its name has lost
    /// the program).
    task_devices: HashMap<(String, u32), SchedClassifierLinkId>,
    /// `meshgate_tc_in` is on the uplink (attached once, before XDP).
    tc_in: bool,
    /// How long a task gone from the table keeps its established flows (see [`Mesh::set_drain`]).
    drain: Duration,
    /// Slots of gone tasks, live for their established flows until then.
    draining: Vec<(Instant, u32)>,
    /// `local_addrs` entries of gone tasks, kept until then.
    addresses_draining: HashMap<u32, Instant>,
}

/// What [`Mesh::set_drain`] is until set.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, MeshError> {
    ebpf.take_map(name)
        .ok_or(MeshError::Map(name, aya::maps::MapError::InvalidName { name: name.to_owned() }))
}

fn typed<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    name: &'static str,
    map: aya::maps::Map,
) -> Result<T, MeshError> {
    T::try_from(map).map_err(|e| MeshError::Map(name, e))
}

fn map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, MeshError> {
    typed(name, take(ebpf, name)?)
}

impl Mesh {
    /// Loads the programs (not attached yet) for a node whose uplink address is `node_ip`.
    /// With `pin_dir` (a directory on a bpffs), the reply table is pinned there and shared
    /// with the next agent of this node: during a rolling update, the replies of connections
    /// this agent translated keep their translation once it is gone.
    pub fn load(node_ip: Ipv4Addr, pin_dir: Option<&std::path::Path>) -> Result<Self, MeshError> {
        if OBJECT.is_empty() {
            return Err(MeshError::NotBuilt);
        }
        let node = u32::from_ne_bytes(node_ip.octets());
        let mut loader = EbpfLoader::new();
        loader.override_global("node_ip", &node, true);
        let pin = pin_dir.map(replies_pin).transpose()?;
        if let Some(pin) = &pin {
            loader.map_pin_path("replies", pin.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| match (&pin, e) {
            (Some(pin), aya::EbpfError::MapError(e)) => MeshError::Pin(pin.clone(), e.to_string()),
            (_, e) => MeshError::Load(e),
        })?;
        for name in ["meshgate_xdp", "meshgate_tc_in", "meshgate_tc_reply"] {
            let program = ebpf
                .program_mut(name)
                .ok_or(MeshError::Program(name, aya::programs::ProgramError::UnexpectedProgramType))?;
            let loaded = match program {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
            };
            loaded.map_err(|e| MeshError::Program(name, e))?;
        }
        let services = take(&mut ebpf, "services")?;
        let counters = CounterReader::new(
            twin("services", &services)?,
            take(&mut ebpf, "verdict_stats")?,
            take(&mut ebpf, "service_stats")?,
            take(&mut ebpf, "flows")?,
        );
        Ok(Self {
            services: typed("services", services)?,
            maglev: map(&mut ebpf, "maglev")?,
            backends: map(&mut ebpf, "backends")?,
            local_addrs: map(&mut ebpf, "local_addrs")?,
            counters,
            ebpf,
            ids: Allocator::new(MAX_SERVICES),
            slots: Allocator::new(MAX_BACKENDS),
            rows: HashMap::new(),
            task_devices: HashMap::new(),
            tc_in: false,
            drain: DEFAULT_DRAIN,
            draining: Vec::new(),
            addresses_draining: HashMap::new(),
        })
    }

    fn xdp(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut("meshgate_xdp")
            .and_then(|p| p.try_into().ok())
            .expect("the object has meshgate_xdp")
    }

    fn classifier(&mut self, name: &'static str) -> &mut SchedClassifier {
        self.ebpf.program_mut(name).and_then(|p| p.try_into().ok()).expect("the object has its tc programs")
    }

    /// Attaches the tc program that unwraps other nodes' packets and delivers translated ones
    /// to local tasks to `uplink`'s ingress, then XDP (native, else generic). The tc program
    /// goes first and once: it can sit beside a previous agent's, while XDP cannot, so during
    /// a hand-over this is called again until the previous agent lets go of XDP (its tc
    /// program drops what nobody translates meanwhile, see `meshgate_tc_in`).
    pub fn attach(&mut self, uplink: &str) -> Result<Attached, MeshError> {
        if !std::path::Path::new("/sys/class/net").join(uplink).exists() {
            return Err(MeshError::NoInterface(uplink.to_owned()));
        }
        if !self.tc_in {
            attach_ingress(self.classifier("meshgate_tc_in"), uplink)
                .map_err(|e| MeshError::Program("meshgate_tc_in", e))?;
            self.tc_in = true;
        }
        let mode = match self.xdp().attach(uplink, XdpMode::Driver) {
            Ok(_) => Attached::Native,
            Err(native) => {
                tracing::info!(uplink, "XDP: native mode refused ({native}); using generic mode");
                self.xdp().attach(uplink, XdpMode::Skb).map_err(|e| MeshError::Program("meshgate_xdp", e))?;
                Attached::Generic
            }
        };
        Ok(mode)
    }

    /// Puts the reply translation on the ingress of exactly `devices` (name, ifindex): the
    /// devices local tasks are reached through (a Docker bridge, a task's veth), where their
    /// replies enter the node. Returns the devices it could not attach to, with the reason.
    pub fn set_task_devices(&mut self, devices: &HashSet<(String, u32)>) -> Vec<(String, MeshError)> {
        let gone: Vec<(String, u32)> =
            self.task_devices.keys().filter(|d| !devices.contains(*d)).cloned().collect();
        for device in gone {
            let link = self.task_devices.remove(&device).expect("present");
            // A device that was deleted took the program with it.
            let _ = self.classifier("meshgate_tc_reply").detach(link);
        }
        let mut failed = Vec::new();
        for device in devices {
            if self.task_devices.contains_key(device) {
                continue;
            }
            match attach_ingress(self.classifier("meshgate_tc_reply"), &device.0) {
                Ok(link) => {
                    self.task_devices.insert(device.clone(), link);
                }
                Err(e) => failed.push((device.0.clone(), MeshError::Program("meshgate_tc_reply", e))),
            }
        }
        failed
    }

    /// Makes the maps say what `table` says, in an order where no packet sees a half-made
    /// state: ports no longer published go first; then, per port, its tasks and Maglev row,
    /// its service entry last; slots of tasks gone everywhere are emptied and freed only at the
    /// end, so no row still pointing at one can meet it reused by another task.
    pub fn sync(&mut self, table: &PortTable) -> Result<(), MeshError> {
        let wanted: BTreeMap<(Protocol, u16), &crate::PublishedPort> =
            table.ports.iter().map(|p| ((p.protocol, p.port), p)).collect();
        for ((proto, port), id) in self.ids.release_except(&wanted.keys().copied().collect()) {
            let _ = self.services.remove(&svc_key(proto, port));
            self.rows.remove(&id);
            self.ids.free(id);
        }
        let live: HashSet<(Ipv4Addr, SocketAddrV4)> =
            wanted.values().flat_map(|p| p.backends.iter().map(|b| (b.node_addr, b.addr))).collect();
        let gone = self.slots.release_except(&live);
        for (&(proto, port), published) in &wanted {
            let id = self.ids.get((proto, port)).ok_or(MeshError::Full("published ports", MAX_SERVICES))?;
            let serving: Vec<&crate::Backend> =
                published.backends.iter().filter(|b| b.local || !published.local_only).collect();
            let mut slot_of = Vec::with_capacity(serving.len());
            for b in &serving {
                let slot =
                    self.slots.get((b.node_addr, b.addr)).ok_or(MeshError::Full("tasks", MAX_BACKENDS))?;
                let flags = BACKEND_LIVE | if b.local { BACKEND_LOCAL } else { 0 };
                let value = BackendSlot {
                    addr: u32::from_ne_bytes(b.addr.ip().octets()),
                    node_addr: u32::from_ne_bytes(b.node_addr.octets()),
                    port: b.addr.port().to_be(),
                    flags,
                };
                self.backends.set(slot, value, 0).map_err(|e| MeshError::Map("backends", e))?;
                slot_of.push(slot);
            }
            let names: Vec<String> = serving.iter().map(|b| format!("{}/{}", b.node_addr, b.addr)).collect();
            let row: Vec<u32> =
                maglev::table(&names, MAGLEV_SIZE).iter().map(|&i| slot_of[i as usize]).collect();
            let row = if row.is_empty() { vec![u32::MAX; MAGLEV_SIZE as usize] } else { row };
            if self.rows.get(&id) != Some(&row) {
                for (i, slot) in row.iter().enumerate() {
                    self.maglev
                        .set(id * MAGLEV_SIZE + i as u32, slot, 0)
                        .map_err(|e| MeshError::Map("maglev", e))?;
                }
                self.rows.insert(id, row);
            }
            let info = SvcInfo { id };
            self.services.insert(svc_key(proto, port), info, 0).map_err(|e| MeshError::Map("services", e))?;
        }
        self.sync_local_addresses(table)?;
        // No new flow reaches these tasks (no row names them); their established flows go on
        // until the drain ends, then end with a reset and the slots are free again.
        let until = Instant::now() + self.drain;
        for (_, slot) in gone {
            let mut value = self.backends.get(&slot, 0).map_err(|e| MeshError::Map("backends", e))?;
            value.flags |= BACKEND_DRAINING;
            self.backends.set(slot, value, 0).map_err(|e| MeshError::Map("backends", e))?;
            self.draining.push((until, slot));
        }
        self.expire_drained()
    }

    /// A task gone from the table keeps its established flows this long, taking no new one:
    /// a task being stopped finishes what it serves (Docker gives it 10 s by default). Zero:
    /// its flows are reset at once. A shorter drain applies to the tasks draining now too.
    pub fn set_drain(&mut self, drain: Duration) {
        self.drain = drain;
        let latest = Instant::now() + drain;
        for until in
            self.draining.iter_mut().map(|(until, _)| until).chain(self.addresses_draining.values_mut())
        {
            *until = (*until).min(latest);
        }
    }

    /// Ends the drains that are over: their flows are reset from here on. Called by every
    /// sync, and by the agent every second.
    pub fn expire_drained(&mut self) -> Result<(), MeshError> {
        let now = Instant::now();
        let (over, kept): (Vec<_>, Vec<_>) = self.draining.drain(..).partition(|(until, _)| *until <= now);
        self.draining = kept;
        for (_, slot) in over {
            self.backends.set(slot, BackendSlot::default(), 0).map_err(|e| MeshError::Map("backends", e))?;
            self.slots.free(slot);
        }
        let over: Vec<u32> =
            self.addresses_draining.iter().filter(|(_, until)| **until <= now).map(|(k, _)| *k).collect();
        for key in over {
            self.addresses_draining.remove(&key);
            let _ = self.local_addrs.remove(&key);
        }
        Ok(())
    }

    /// The addresses other nodes name this node's tasks by, and where this node reaches them.
    fn sync_local_addresses(&mut self, table: &PortTable) -> Result<(), MeshError> {
        let ne = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        let wanted: HashMap<u32, u32> =
            table.local_addresses.iter().map(|(from, to)| (ne(*from), ne(*to))).collect();
        let stale: Vec<u32> =
            self.local_addrs.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
        let until = Instant::now() + self.drain;
        for key in stale {
            // Established flows from other nodes keep reaching the task while it drains.
            self.addresses_draining.entry(key).or_insert(until);
        }
        for (from, to) in wanted {
            self.addresses_draining.remove(&from);
            if self.local_addrs.get(&from, 0).ok() != Some(to) {
                self.local_addrs.insert(from, to, 0).map_err(|e| MeshError::Map("local_addrs", e))?;
            }
        }
        Ok(())
    }

    /// The programs' counters (see [`CounterReader::twin`] for a reader of one's own).
    #[must_use]
    pub fn counters(&self) -> &CounterReader {
        &self.counters
    }

    /// Runs the XDP program once on `packet` (BPF_PROG_TEST_RUN): the verdict and the packet
    /// as the program left it.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>), MeshError> {
        use aya::programs::{TestRun, TestRunOptions};
        let mut out = vec![0u8; packet.len() + 256];
        let result = self
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(|e| MeshError::Program("meshgate_xdp", e))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// The reply table's entry for `key` (a task's answer to a client), for tests.
    #[cfg(test)]
    pub(crate) fn reply(&mut self, key: crate::maps::FlowKey) -> Option<crate::maps::ReplyVal> {
        let map: BpfHashMap<&MapData, crate::maps::FlowKey, crate::maps::ReplyVal> =
            BpfHashMap::try_from(self.ebpf.map("replies")?).ok()?;
        map.get(&key, 0).ok()
    }

    /// Sets the reply table's entry for `key`, as another node's packet would, for tests.
    #[cfg(test)]
    pub(crate) fn set_reply(&mut self, key: crate::maps::FlowKey, value: crate::maps::ReplyVal) {
        let mut map: BpfHashMap<&mut MapData, crate::maps::FlowKey, crate::maps::ReplyVal> =
            BpfHashMap::try_from(self.ebpf.map_mut("replies").unwrap()).unwrap();
        map.insert(key, value, 0).unwrap();
    }

    /// Nanoseconds per run of the XDP program on `packet`, over `repeat` runs.
    pub fn time_per_packet(&mut self, packet: &[u8], repeat: u32) -> Result<std::time::Duration, MeshError> {
        use aya::programs::{TestRun, TestRunOptions};
        let result = self
            .xdp()
            .test_run(TestRunOptions { data_in: Some(packet), repeat, ..TestRunOptions::new() })
            .map_err(|e| MeshError::Program("meshgate_xdp", e))?;
        Ok(result.duration)
    }
}

/// Attaches a tc program to `device`'s ingress: as a TCX link (Linux 6.6 and later), else
/// through a `clsact` qdisc, added if missing.
fn attach_ingress(
    program: &mut SchedClassifier,
    device: &str,
) -> Result<SchedClassifierLinkId, aya::programs::ProgramError> {
    program.attach(device, TcAttachType::Ingress).or_else(|first| {
        if aya::programs::tc::qdisc_add_clsact(device).is_err() {
            return Err(first);
        }
        program.attach(device, TcAttachType::Ingress)
    })
}

fn svc_key(proto: Protocol, port: u16) -> SvcKey {
    SvcKey { port: port.to_be(), proto: proto.ip_number(), pad: 0 }
}

/// Stable small numbers for things that come and go (service ids, backend slots): a thing
/// keeps its number while it exists; a freed number is reused later.
struct Allocator<K> {
    given: HashMap<K, u32>,
    free: Vec<u32>,
    next: u32,
    max: u32,
}

impl<K: std::hash::Hash + Eq + Clone> Allocator<K> {
    fn new(max: u32) -> Self {
        Self { given: HashMap::new(), free: Vec::new(), next: 0, max }
    }

    fn get(&mut self, key: K) -> Option<u32> {
        if let Some(n) = self.given.get(&key) {
            return Some(*n);
        }
        let n = self.free.pop().or_else(|| {
            (self.next < self.max).then(|| {
                self.next += 1;
                self.next - 1
            })
        })?;
        self.given.insert(key, n);
        Some(n)
    }

    /// Forgets every key not in `keep`; returns them with their numbers, which stay taken
    /// until [`Allocator::free`].
    fn release_except(&mut self, keep: &HashSet<K>) -> Vec<(K, u32)> {
        let gone: Vec<K> = self.given.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        gone.into_iter()
            .map(|k| {
                let n = self.given.remove(&k).expect("present");
                (k, n)
            })
            .collect()
    }

    fn free(&mut self, n: u32) {
        self.free.push(n);
    }
}
