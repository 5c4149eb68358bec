//! Which device the kernel routes a local task's address through (`/proc/net/route`, the
//! main IPv4 table): where the task's replies enter the node, so where the reply
//! translation must sit.

use std::collections::HashSet;
use std::net::Ipv4Addr;

/// One route of the main table: destination prefix and device.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    dest: u32,
    mask: u32,
    device: String,
}

/// Parses `/proc/net/route` (addresses are printed as the host-order integer of their
/// network-order bytes).
fn parse(table: &str) -> Vec<Route> {
    let hex = |field: &str| u32::from_str_radix(field, 16).ok().map(|v| u32::from_be_bytes(v.to_ne_bytes()));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (device, dest, mask) = (fields.first()?, hex(fields.get(1)?)?, hex(fields.get(7)?)?);
            Some(Route { dest: dest & mask, mask, device: (*device).to_owned() })
        })
        .collect()
}

/// The device of the longest matching route.
fn device_for(routes: &[Route], addr: Ipv4Addr) -> Option<&str> {
    let a = u32::from(addr);
    routes
        .iter()
        .filter(|r| a & r.mask == r.dest)
        .max_by_key(|r| r.mask.count_ones())
        .map(|r| r.device.as_str())
}

/// The device of the node's own network: the one the main table reaches `addr` (the node's
/// address) through, by a route that is not the default. `None` without such a route.
#[must_use]
pub fn device_of_network(addr: Ipv4Addr) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let routes: Vec<Route> = parse(&table).into_iter().filter(|r| r.mask != 0).collect();
    device_for(&routes, addr).map(str::to_owned)
}

/// The devices (name and ifindex) the main routing table sends `addrs` through. Addresses
/// without a route, and devices that vanished meanwhile, are left out.
#[must_use]
pub fn devices_toward(addrs: impl IntoIterator<Item = Ipv4Addr>) -> HashSet<(String, u32)> {
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else { return HashSet::new() };
    let routes = parse(&table);
    addrs
        .into_iter()
        .filter_map(|a| device_for(&routes, a))
        .collect::<HashSet<&str>>()
        .into_iter()
        .filter_map(|d| Some((d.to_owned(), ifindex(d)?)))
        .collect()
}

/// The interface index of `device`, `None` once it is gone.
#[must_use]
pub fn ifindex(device: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{device}/ifindex")).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_matching_route_gives_the_device() {
        // As printed on a little-endian host: 10.0.9.0/24 on br0, 10.0.0.0/8 on eth1, default via eth0.
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth1\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
                     br0\t0009000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let table = if cfg!(target_endian = "little") { table.to_owned() } else { return };
        let routes = parse(&table);
        assert_eq!(device_for(&routes, Ipv4Addr::new(10, 0, 9, 2)), Some("br0"));
        assert_eq!(device_for(&routes, Ipv4Addr::new(10, 1, 0, 1)), Some("eth1"));
        assert_eq!(device_for(&routes, Ipv4Addr::new(192, 0, 2, 1)), Some("eth0"));
    }
}
