//! Reading the programs' counters: packets and bytes by verdict and by published port, and
//! the flows in the connection table. A [`CounterReader`] holds its own handles on the maps
//! (their descriptors duplicated), so it can be read from anywhere, a Prometheus scrape,
//! while the [`crate::Mesh`] that loaded them is synced elsewhere.

use std::os::fd::AsFd;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};

use crate::maps::{Counters, FlowKey, FlowVal, SvcInfo, SvcKey, VERDICTS};
use crate::{MeshError, Protocol};

/// Handles on the maps the counters are read from.
pub struct CounterReader {
    services: Map,
    verdicts: Map,
    service_stats: Map,
    flows: Map,
}

/// Another handle on `map`.
pub(crate) fn twin(name: &'static str, map: &Map) -> Result<Map, MeshError> {
    let (data, kind): (&MapData, fn(MapData) -> Map) = match map {
        Map::HashMap(d) => (d, Map::HashMap),
        Map::LruHashMap(d) => (d, Map::LruHashMap),
        Map::PerCpuArray(d) => (d, Map::PerCpuArray),
        _ => return Err(MeshError::Map(name, aya::maps::MapError::InvalidName { name: name.to_owned() })),
    };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| MeshError::Handle(name, e))?;
    Ok(kind(MapData::from_fd(fd).map_err(|e| MeshError::Map(name, e))?))
}

impl CounterReader {
    pub(crate) fn new(services: Map, verdicts: Map, service_stats: Map, flows: Map) -> Self {
        Self { services, verdicts, service_stats, flows }
    }

    /// Another reader of the same maps (for another thread).
    pub fn twin(&self) -> Result<Self, MeshError> {
        Ok(Self {
            services: twin("services", &self.services)?,
            verdicts: twin("verdict_stats", &self.verdicts)?,
            service_stats: twin("service_stats", &self.service_stats)?,
            flows: twin("flows", &self.flows)?,
        })
    }

    /// Packets and bytes by verdict, summed over CPUs, with the metric label of each.
    #[must_use]
    pub fn verdicts(&self) -> Vec<(&'static str, Counters)> {
        VERDICTS.iter().enumerate().map(|(i, name)| (*name, sum(&self.verdicts, i as u32))).collect()
    }

    /// Packets and bytes of every published port, summed over CPUs.
    #[must_use]
    pub fn ports(&self) -> Vec<(Protocol, u16, Counters)> {
        let Ok(services) = BpfHashMap::<&MapData, SvcKey, SvcInfo>::try_from(&self.services) else {
            return Vec::new();
        };
        services
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, info)| {
                let protocol = match key.proto {
                    6 => Protocol::Tcp,
                    17 => Protocol::Udp,
                    _ => return None,
                };
                Some((protocol, u16::from_be(key.port), sum(&self.service_stats, info.id)))
            })
            .collect()
    }

    /// Packets and bytes of one published port.
    #[must_use]
    pub fn port(&self, protocol: Protocol, port: u16) -> Option<Counters> {
        self.ports().into_iter().find(|(p, n, _)| (*p, *n) == (protocol, port)).map(|(_, _, c)| c)
    }

    /// Flows in the connection table now (of `maps::MAX_FLOWS`; the oldest are evicted
    /// beyond). Walks the table: for a scrape, not per packet.
    #[must_use]
    pub fn flow_count(&self) -> usize {
        BpfHashMap::<&MapData, FlowKey, FlowVal>::try_from(&self.flows)
            .map_or(0, |flows| flows.keys().map_while(Result::ok).count())
    }
}

fn sum(map: &Map, index: u32) -> Counters {
    let Ok(map) = PerCpuArray::<&MapData, Counters>::try_from(map) else { return Counters::default() };
    map.get(&index, 0).map_or_else(
        |_| Counters::default(),
        |values| {
            values.iter().fold(Counters::default(), |acc, c| Counters {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
        },
    )
}
