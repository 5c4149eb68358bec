//! Providers: sources of [`crate::state::MeshState`]. Each one only publishes to the hub.

pub mod docker;
pub mod file;
