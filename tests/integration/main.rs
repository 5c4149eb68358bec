//! meshgate's integration tests: real sockets, real backends, real clients (hyper and curl),
//! the real binary where signals and files matter. One binary, one module per area.

// Allowed because: an end-to-end test reads as one story of steps against the real parts.
#![allow(clippy::too_many_lines)]

mod harness;

mod abuse;
mod access_log;
mod acme;
mod admin;
mod balancer;
mod behaviour;
mod ca_faults;
mod chaos;
mod cluster;
mod dashboard;
mod dns;
mod dns01;
mod docker;
mod lab;
mod lifecycle;
mod limits;
mod mesh;
mod middlewares;
mod monitoring;
mod on_demand;
mod readme;
mod resilience;
mod routing;
mod streaming;
mod swarm;
mod tls;
mod traefik_docs;
