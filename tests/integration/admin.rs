//! The admin endpoints.
