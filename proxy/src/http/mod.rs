//! The HTTP reverse proxy: listener, route table, endpoints and the request path.

pub mod access_log;
pub mod affinity;
pub mod basic_auth;
pub mod body;
pub mod condition;
pub mod endpoint;
pub mod health;
pub mod limits;
pub mod middleware;
pub mod proxy;
mod proxy_protocol;
pub mod router;
pub mod server;
mod tunnel;
