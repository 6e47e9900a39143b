//! The one error shape of both files jat-proxy reads (the configuration and the key file):
//! which file, where in it, which key, what is wrong. It never quotes the file.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::tomldiag;

/// Which file a [`FileError`] is about; its message starts with the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The configuration file (`config FILE...`).
    Config,
    /// The token key file (`key file FILE...`).
    KeyFile,
}

impl FileKind {
    fn name(self) -> &'static str {
        match self {
            FileKind::Config => "config",
            FileKind::KeyFile => "key file",
        }
    }
}

/// A mistake in the configuration or the key file (or a file that cannot be read): the file,
/// the line, column and dotted key of the mistake when it has a place, and what is wrong.
/// Nothing in it comes from the file's values.
///
/// Shown as `config FILE[:LINE:COLUMN]: [`KEY`: ]REASON` (`key file ...` for the key file).
#[derive(Debug, Clone)]
pub struct FileError {
    /// Which file this is about.
    pub kind: FileKind,
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the mistake, when it has a place in the file.
    pub line: Option<usize>,
    /// 1-based column of the mistake, when it has a place in the file.
    pub column: Option<usize>,
    /// The dotted key at fault (`component.secret`, `key[1].secret`), when one is.
    pub key: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl FileError {
    /// An error about the file as a whole (it cannot be read, say), or about `key` when
    /// given, without a place (see [`FileError::placed`]).
    pub(crate) fn new(
        kind: FileKind,
        path: &Path,
        key: Option<&str>,
        reason: impl Into<String>,
    ) -> FileError {
        FileError {
            kind,
            path: path.to_owned(),
            line: None,
            column: None,
            key: key.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// An error at `key` of the file's `text`, placed at that key's value (or, if the key
    /// is absent, at the table that should hold it).
    pub(crate) fn at(
        kind: FileKind,
        path: &Path,
        text: &str,
        key: &str,
        reason: impl Into<String>,
    ) -> FileError {
        FileError::new(kind, path, Some(key), reason).placed(text)
    }

    /// A problem found after parsing ([`Invalid`]), placed in `text`.
    pub(crate) fn invalid(kind: FileKind, path: &Path, text: &str, invalid: Invalid) -> FileError {
        FileError::at(kind, path, text, &invalid.key, invalid.reason)
    }

    /// What toml or serde found wrong with `text`, without quoting it.
    pub(crate) fn from_toml(
        kind: FileKind,
        path: &Path,
        text: &str,
        e: &toml::de::Error,
    ) -> FileError {
        let d = tomldiag::diagnose(text, e);
        FileError {
            kind,
            path: path.to_owned(),
            line: d.line,
            column: d.column,
            key: d.key,
            reason: d.message,
        }
    }

    /// Places an error that names a key but has no place yet at that key in `text`.
    pub(crate) fn placed(mut self, text: &str) -> FileError {
        if self.line.is_none()
            && let Some(key) = &self.key
            && let Some((line, column)) = tomldiag::locate(text, key)
        {
            self.line = Some(line);
            self.column = Some(column);
        }
        self
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.name(), self.path.display())?;
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, ":{l}:{c}")?,
            (Some(l), None) => write!(f, ":{l}")?,
            _ => {}
        }
        match &self.key {
            Some(k) => write!(f, ": `{k}`: {}", self.reason),
            None => write!(f, ": {}", self.reason),
        }
    }
}

impl std::error::Error for FileError {}

/// What a section's validation finds wrong: the dotted key and why, before it is placed in
/// a file (by [`FileError::invalid`]). The reason never holds the key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// The dotted key at fault.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Invalid {
    /// `key` is wrong: `reason`.
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_with_the_place_and_key_when_known() {
        let e = FileError::new(FileKind::Config, Path::new("c.toml"), None, "cannot read");
        assert_eq!(e.to_string(), "config c.toml: cannot read");
        let text = "[keys]\nfile = \"\"\n";
        let e = FileError::at(
            FileKind::Config,
            Path::new("c.toml"),
            text,
            "keys.file",
            "bad",
        );
        assert_eq!(e.to_string(), "config c.toml:2:8: `keys.file`: bad");
        let e = FileError::at(FileKind::KeyFile, Path::new("k.toml"), "", "key", "no keys");
        assert_eq!(e.to_string(), "key file k.toml: `key`: no keys");
        let e = FileError {
            line: Some(3),
            ..FileError::new(FileKind::KeyFile, Path::new("k.toml"), None, "x")
        };
        assert_eq!(e.to_string(), "key file k.toml:3: x");
    }
}
