//! Rust mirrors of `bpf/structs.h` and `bpf/consts.h`: one `#[repr(C)]` type per C struct,
//! each with a size check, so a layout change on one side fails the build.
#![allow(unsafe_code)] // `aya::Pod` is an unsafe marker: each type below is plain bytes.

/// `consts.h`: sizes the loader must agree with.
pub const MAX_SERVICES: u32 = 256;
pub const MAX_BACKENDS: u32 = 4096;
pub const MAGLEV_SIZE: u32 = 1021;

pub const BACKEND_LOCAL: u16 = 1;
pub const BACKEND_LIVE: u16 = 2;
pub const BACKEND_DRAINING: u16 = 4;

/// `verdict_stats` indexes, with the names the metrics use.
pub const VERDICTS: [&str; 14] = [
    "pass_not_ipv4",
    "pass_truncated",
    "pass_ip_options",
    "pass_fragment",
    "pass_other_proto",
    "pass_not_published",
    "local",
    "remote",
    "drop_no_backend",
    "reply",
    "decap",
    "drop_no_route",
    "reset",
    "drop_untranslated",
];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcKey {
    /// Network order.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcInfo {
    pub id: u32,
}

/// Addresses and ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendSlot {
    pub addr: u32,
    pub node_addr: u32,
    pub port: u16,
    pub flags: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// A connection-table key (one direction of a flow), network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowVal {
    pub backend: u32,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// What a task's reply must look like to the client (`replies`, shared between agents).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyVal {
    pub addr: u32,
    pub port: u16,
    /// `REPLY_*` bits of `consts.h`: how far the TCP connection through the mesh has closed.
    pub state: u16,
    pub syn_seq: u32,
}

/// `consts.h`: MAX_FLOWS, the connection table's size.
pub const MAX_FLOWS: u32 = 65536;

const _: () = assert!(size_of::<FlowKey>() == 16);
const _: () = assert!(size_of::<FlowVal>() == 12);
const _: () = assert!(size_of::<ReplyVal>() == 12);
const _: () = assert!(size_of::<SvcKey>() == 4);
const _: () = assert!(size_of::<SvcInfo>() == 4);
const _: () = assert!(size_of::<BackendSlot>() == 12);
const _: () = assert!(size_of::<Counters>() == 16);

// SAFETY: `#[repr(C)]`, no padding (checked by the sizes above), every bit pattern valid.
unsafe impl aya::Pod for SvcKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for BackendSlot {}
// SAFETY: as above.
unsafe impl aya::Pod for Counters {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowVal {}
// SAFETY: as above.
unsafe impl aya::Pod for ReplyVal {}
