//! The L4 mesh's place in the agent: the `[mesh]` settings ([`config`]); the published ports
//! of each new state become a [`PortTable`](meshgate_ebpf::PortTable) ([`port_table`]) that
//! the BPF maps are synced to ([`run`], with the reply translation on the devices of local
//! tasks, [`devices`], and fresh neighbour entries, [`neighbours`]); the BPF counters are
//! read at scrape time ([`metrics`]); the port table in force is shown by `/api/state`
//! ([`view`]).

mod config;
mod devices;
mod metrics;
mod neighbours;
mod port_table;
mod run;
mod view;

pub use config::{MeshConfig, AUTO};
pub use port_table::port_table;
pub use run::run;
pub use view::MeshView;
