//! `[policy]`: who may send requests.

use serde::Deserialize;

use super::error::Invalid;
use crate::policy::{Entry, Policy};

/// `[policy]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

impl RawPolicy {
    /// The validated section.
    pub(super) fn validate(&self) -> Result<Policy, Invalid> {
        Ok(Policy {
            allow: list("policy.allow", &self.allow)?,
            deny: list("policy.deny", &self.deny)?,
        })
    }
}

fn list(key: &str, items: &[String]) -> Result<Vec<Entry>, Invalid> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Entry::parse(s).ok_or_else(|| {
                Invalid::new(
                    format!("{key}[{i}]"),
                    "neither a domain nor an account address",
                )
            })
        })
        .collect()
}
