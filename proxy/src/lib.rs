//! meshgate: a routing mesh and reverse proxy agent for Docker and Docker Swarm nodes.
//!
//! Data flows one way: providers publish [`state::MeshState`] snapshots into the
//! [`state::StateHub`]; consumers (the HTTP route table today) compile their own view from
//! the newest snapshot and swap it in atomically. See `docs/architecture.md`.

pub mod acme;
pub mod admin;
pub mod agent;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dns;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod invalid;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod provider;
pub mod readiness;
pub mod settings;
pub mod state;
pub mod tls;
pub mod whoami;
