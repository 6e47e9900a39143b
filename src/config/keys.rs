//! `[keys]`: the token key file, and how often running instances check it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::error::Invalid;
use super::range;

/// What `jat-proxy keys rotate` and `keys list` need: the `[keys]` section and
/// `[proxy] token_lifetime_secs` (for pruning). Nothing else is read or required, so the key
/// commands work where the component secret cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysConfig {
    /// The key file.
    pub key_file: PathBuf,
    /// How often running instances check the key file.
    pub reload_interval: Duration,
    /// The longest lifetime of the tokens instances seal, in seconds: the IQ token lifetime,
    /// or the message token lifetime when messages are forwarded. A superseded key is kept
    /// that long.
    pub token_lifetime: u64,
}

/// `[keys]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeys {
    file: PathBuf,
    #[serde(default = "d_reload")]
    reload_interval_secs: u64,
}

fn d_reload() -> u64 {
    10
}

impl RawKeys {
    /// The validated section, with `token_lifetime` (the longest of `[proxy]`).
    pub(super) fn validate(&self, token_lifetime: u64) -> Result<KeysConfig, Invalid> {
        if self.file.as_os_str().is_empty() || self.file.file_name().is_none() {
            return Err(Invalid::new("keys.file", "must be the path of a file"));
        }
        Ok(KeysConfig {
            key_file: self.file.clone(),
            reload_interval: range::secs(
                "keys.reload_interval_secs",
                self.reload_interval_secs,
                1..=3600,
            )?,
            token_lifetime,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::tests::GOOD;
    use super::super::{parse, parse_keys};

    #[test]
    fn key_commands_need_only_the_keys_section() {
        let only = "[keys]\nfile = \"/k.toml\"\n";
        let k = parse_keys(Path::new("t"), only).unwrap();
        assert_eq!(k.key_file, Path::new("/k.toml"));
        assert_eq!(k.token_lifetime, 300);
        assert_eq!(k.reload_interval, Duration::from_secs(10));
        assert!(parse(Path::new("t"), only).is_err());
        // Incomplete or unresolvable other sections do not matter; the lifetime does.
        let text = GOOD
            .replace("secret = \"s3cret\"", "secret_env = true\nbogus = 1")
            .replace(
                "target_address = \"impl@localhost\"",
                "token_lifetime_secs = 600",
            );
        let k = parse_keys(Path::new("t"), &text).unwrap();
        assert_eq!(k.token_lifetime, 600);
        let e = parse_keys(Path::new("t"), &text.replace("600", "5")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.token_lifetime_secs"));
        let e = parse_keys(Path::new("t"), "[proxy]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("keys"), "{e}");
        let e =
            parse_keys(Path::new("t"), &format!("{GOOD}reload_interval_secs = 0\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("keys.reload_interval_secs"), "{e}");
    }
}
