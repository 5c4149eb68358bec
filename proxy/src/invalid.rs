//! The error of a setting whose value its type allows but the agent cannot use; each
//! section of the config checks its own values with it (no part depends on `config` for it).

/// A value the types allow but the agent cannot use: which key, what it holds, what to write.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{key}` = {value}: {expected}")]
pub struct Invalid {
    pub key: &'static str,
    pub value: String,
    pub expected: String,
}

impl Invalid {
    pub fn new(key: &'static str, value: impl std::fmt::Display, expected: impl Into<String>) -> Self {
        Self { key, value: value.to_string(), expected: expected.into() }
    }
}
