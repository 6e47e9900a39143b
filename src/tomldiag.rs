//! Reporting mistakes in a TOML file (the configuration, the key file) without ever echoing
//! what the file contains.
//!
//! `toml::de::Error`'s `Display` prints the offending line with a caret under it, and serde's
//! own messages embed the value they did not like (`invalid type: integer `12345`, expected a
//! string`). Both files hold secrets, so neither may reach a log: a typo next to a secret would
//! print the secret. Instead a mistake is reported as line, column, the dotted key at fault,
//! and a message built only from what toml and serde *expected* (which comes from the program,
//! not the file).
//!
//! Key names are part of the file too; one is shown only if it looks like a key name
//! (lowercase letters, `_` and `-`, as every key jat-proxy knows), so that a secret pasted
//! where a key belongs (`QUJD=` alone on a line parses as the key `QUJD`) is not printed.

use toml::de::{DeTable, DeValue};

/// Where a mistake is and what it is; nothing in it comes from the file's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Diagnosis {
    /// 1-based line, when toml knows where.
    pub line: Option<usize>,
    /// 1-based column (in characters), when toml knows where.
    pub column: Option<usize>,
    /// The dotted key at fault (`component.secret`, `key[1].secret`), when one is known.
    pub key: Option<String>,
    /// What is wrong, without any value from the file.
    pub message: String,
}

/// What is shown instead of a key name that does not look like one.
const HIDDEN: &str = "<hidden>";
/// Longest message kept (toml's "expected one of" lists are short; this bounds odd ones).
const MAX_MESSAGE: usize = 300;

/// Explains a toml error on `text` without quoting `text`.
pub(crate) fn diagnose(text: &str, error: &toml::de::Error) -> Diagnosis {
    let raw = error.message();
    let message = sanitise(raw);
    let Some(span) = error.span() else {
        return Diagnosis {
            line: None,
            column: None,
            key: missing_field(raw).map(str::to_owned),
            message,
        };
    };
    let offset = span.start.min(text.len());
    let (line, column) = position(text, offset);
    let mut path = match missing_field(raw) {
        // serde reports a missing field at the span of the table that lacks it.
        Some(_) => table_with_span(text, &span).unwrap_or_default(),
        None => path_at(text, offset).unwrap_or_else(|| path_by_lines(text, offset)),
    };
    if let Some(field) = missing_field(raw) {
        path.push(Seg::Name(field.to_owned()));
    }
    Diagnosis {
        line: Some(line),
        column: Some(column),
        key: (!path.is_empty()).then(|| render(&path)),
        message,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = match text.get(line_start..offset) {
        Some(s) => s.chars().count() + 1,
        None => offset - line_start + 1,
    };
    (line, column)
}

/// Line and column of the value of `key` (dotted, with `[i]` for array elements) in `text`;
/// if the key is absent, of the deepest table on its path that is present. Used to place
/// errors found after parsing (a value out of range, say).
pub(crate) fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    let path = parse_path(key)?;
    let (root, _) = DeTable::parse_recoverable(text);
    let mut current: Option<&toml::Spanned<DeValue<'_>>> = None;
    let mut found = None;
    for seg in &path {
        let next = match (seg, current.map(|v| v.get_ref())) {
            (Seg::Name(n), None) => root.get_ref().get(n.as_str()),
            (Seg::Name(n), Some(DeValue::Table(t))) => t.get(n.as_str()),
            (Seg::Index(i), Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        let Some(value) = next else { break };
        found = Some(value.span());
        current = Some(value);
    }
    found.map(|s| position(text, s.start))
}

/// A message that says what was expected, never what was found.
fn sanitise(raw: &str) -> String {
    const EXPECTED: &str = ", expected ";
    let (head, expected) = match raw.rfind(EXPECTED) {
        Some(i) => (&raw[..i], Some(&raw[i + EXPECTED.len()..])),
        None => (raw, None),
    };
    let what = if head.starts_with("invalid type") {
        "wrong type"
    } else if head.starts_with("invalid value") {
        "invalid value"
    } else if head.starts_with("invalid length") {
        "wrong number of elements"
    } else if head.starts_with("unknown field") {
        "unknown key"
    } else if head.starts_with("unknown variant") {
        "unknown value"
    } else if head.starts_with("missing field") {
        "missing key"
    } else if head.starts_with("duplicate") {
        "duplicate key"
    } else if is_plain_prose(head) {
        // toml's own syntax errors: fixed descriptions ("invalid basic string", "missing
        // value", ...), which never include the document.
        head
    } else {
        "invalid TOML"
    };
    let mut message = what.to_owned();
    if let Some(expected) = expected {
        message.push_str(", expected ");
        message.push_str(&plain_expected(expected));
    }
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// Words only: no quoted part and no digit, so no value can hide in it.
fn is_plain_prose(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || matches!(c, ' ' | ',' | ';' | '-' | '_'))
}

/// What serde or toml expected, with serde's internal struct names replaced by "a table".
/// This text comes from the program (a type's `expecting`, toml's grammar), never the file.
fn plain_expected(expected: &str) -> String {
    let e = expected.trim();
    if let Some(rest) = e.strip_prefix("struct ") {
        if rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return "a table".to_owned();
        }
    }
    e.to_owned()
}

/// The field name of serde's "missing field `x`": a name from the program's schema.
fn missing_field(raw: &str) -> Option<&str> {
    let rest = raw.strip_prefix("missing field `")?;
    let name = &rest[..rest.find('`')?];
    is_key_name(name).then_some(name)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Name(String),
    Index(usize),
}

fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Name(n) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(if is_key_name(n) { n } else { HIDDEN });
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// Looks like one of jat-proxy's key names: lowercase letters, `_`, `-`, at most 40.
/// Deliberately no digits or capitals: random secrets (hex, base64) nearly always have some.
fn is_key_name(s: &str) -> bool {
    (1..=40).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-')
}

/// `a.b[2].c` as segments (the form [`locate`] takes; written by the program, not the file).
fn parse_path(key: &str) -> Option<Vec<Seg>> {
    let mut path = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() {
            return None;
        }
        path.push(Seg::Name(name.to_owned()));
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            path.push(Seg::Index(r[..end].parse().ok()?));
            rest = &r[end + 1..];
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(path)
}

/// The deepest key whose name or value covers `offset`, from toml's own (partial) parse.
fn path_at(text: &str, offset: usize) -> Option<Vec<Seg>> {
    let (root, _) = DeTable::parse_recoverable(text);
    let mut best: Option<Vec<Seg>> = None;
    let mut path = Vec::new();
    search_table(root.get_ref(), offset, &mut path, &mut best);
    best
}

fn covers(span: &std::ops::Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end
}

fn consider(path: &[Seg], best: &mut Option<Vec<Seg>>) {
    if best.as_ref().is_none_or(|b| path.len() > b.len()) {
        *best = Some(path.to_vec());
    }
}

fn search_table(
    table: &DeTable<'_>,
    offset: usize,
    path: &mut Vec<Seg>,
    best: &mut Option<Vec<Seg>>,
) {
    for (k, v) in table.iter() {
        path.push(Seg::Name(k.get_ref().to_string()));
        if covers(&k.span(), offset) || covers(&v.span(), offset) {
            consider(path, best);
        }
        search_value(v.get_ref(), offset, path, best);
        path.pop();
    }
}

fn search_value(
    value: &DeValue<'_>,
    offset: usize,
    path: &mut Vec<Seg>,
    best: &mut Option<Vec<Seg>>,
) {
    match value {
        DeValue::Table(t) => search_table(t, offset, path, best),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if covers(&item.span(), offset) {
                    consider(path, best);
                }
                search_value(item.get_ref(), offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The table whose span is exactly `span` (serde's "missing field" points at the table).
fn table_with_span(text: &str, span: &std::ops::Range<usize>) -> Option<Vec<Seg>> {
    fn walk(
        value: &DeValue<'_>,
        span: &std::ops::Range<usize>,
        path: &mut Vec<Seg>,
    ) -> Option<Vec<Seg>> {
        match value {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    path.push(Seg::Name(k.get_ref().to_string()));
                    if v.span() == *span && v.get_ref().is_table() {
                        return Some(path.clone());
                    }
                    if let Some(p) = walk(v.get_ref(), span, path) {
                        return Some(p);
                    }
                    path.pop();
                }
                None
            }
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    if item.span() == *span && item.get_ref().is_table() {
                        return Some(path.clone());
                    }
                    if let Some(p) = walk(item.get_ref(), span, path) {
                        return Some(p);
                    }
                    path.pop();
                }
                None
            }
            _ => None,
        }
    }
    if span.is_empty() && span.start == 0 {
        return Some(Vec::new());
    }
    let (root, _) = DeTable::parse_recoverable(text);
    let root = DeValue::Table(root.into_inner());
    walk(&root, span, &mut Vec::new())
}

/// For a syntax error toml could not place in a table: the key written on the error's line
/// (`name = ...`), under the nearest `[table]` or `[[array]]` header above it.
fn path_by_lines(text: &str, offset: usize) -> Vec<Seg> {
    let offset = offset.min(text.len());
    let line_start = text.as_bytes()[..offset]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line_end = text.as_bytes()[offset..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |i| offset + i);
    let line = text.get(line_start..line_end).unwrap_or("");
    let above = text.get(..line_start).unwrap_or("");

    if let Some(header) = header_path(line, above) {
        return header;
    }
    // The nearest header above, and the text above it (to count `[[array]]` elements).
    let mut header = None;
    let mut at = 0;
    for l in above.split_inclusive('\n') {
        if l.trim_start().starts_with('[') {
            header = Some((at, l));
        }
        at += l.len();
    }
    let mut path = header
        .and_then(|(at, l)| header_path(l, &above[..at]))
        .unwrap_or_default();
    if let Some((key, _)) = line.split_once('=') {
        for part in key.split('.') {
            let part = part.trim().trim_matches(|c| c == '"' || c == '\'');
            path.push(Seg::Name(part.to_owned()));
        }
    }
    path
}

/// `[a.b]` or `[[a.b]]` as a path; for an array of tables, the element index is the number
/// of headers with the same name before it (in `above`).
fn header_path(line: &str, above: &str) -> Option<Vec<Seg>> {
    let line = line.trim();
    let (inner, array) = if let Some(r) = line.strip_prefix("[[") {
        (r.split("]]").next()?, true)
    } else if let Some(r) = line.strip_prefix('[') {
        (r.split(']').next()?, false)
    } else {
        return None;
    };
    let mut path: Vec<Seg> = inner
        .split('.')
        .map(|p| Seg::Name(p.trim().trim_matches(|c| c == '"' || c == '\'').to_owned()))
        .collect();
    if array {
        let name = |l: &str| {
            l.trim()
                .strip_prefix("[[")
                .and_then(|r| r.split("]]").next())
                .map(|n| n.replace(' ', ""))
        };
        let me = inner.replace(' ', "");
        let before = above
            .lines()
            .filter(|l| name(l).is_some_and(|n| n == me))
            .count();
        path.push(Seg::Index(before));
    }
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag<T: serde::de::DeserializeOwned>(text: &str) -> Diagnosis {
        let e = toml::from_str::<T>(text).err().expect("an error");
        diagnose(text, &e)
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        a: Table,
        #[serde(default)]
        list: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Table {
        name: String,
        #[serde(default)]
        n: u16,
        #[serde(default)]
        words: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        v: String,
    }

    #[test]
    fn position_counts_lines_and_characters() {
        assert_eq!(position("", 0), (1, 1));
        assert_eq!(position("ab\ncd", 0), (1, 1));
        assert_eq!(position("ab\ncd", 2), (1, 3));
        assert_eq!(position("ab\ncd", 3), (2, 1));
        assert_eq!(position("é\nxé", 6), (2, 3));
        assert_eq!(position("ab", 99), (1, 3));
    }

    #[test]
    fn wrong_type_names_key_and_expectation_only() {
        let d = diag::<Doc>("[a]\nname = 12345\n");
        assert_eq!(d.line, Some(2));
        assert_eq!(d.column, Some(8));
        assert_eq!(d.key.as_deref(), Some("a.name"));
        assert_eq!(d.message, "wrong type, expected a string");
    }

    #[test]
    fn value_out_of_type_range_and_array_element() {
        let d = diag::<Doc>("[a]\nname = \"x\"\nn = 99999\n");
        assert_eq!((d.line, d.key.as_deref()), (Some(3), Some("a.n")));
        assert_eq!(d.message, "invalid value, expected u16");
        let d = diag::<Doc>("[a]\nname = \"x\"\nwords = [\n  \"ok\",\n  77,\n]\n");
        assert_eq!((d.line, d.column), (Some(5), Some(3)));
        assert_eq!(d.key.as_deref(), Some("a.words[1]"));
    }

    #[test]
    fn missing_and_unknown_keys() {
        let d = diag::<Doc>("[a]\nnme = \"x\"\n");
        assert_eq!(d.key.as_deref(), Some("a.nme"));
        assert!(
            d.message.starts_with("unknown key, expected one of"),
            "{d:?}"
        );
        let d = diag::<Doc>("[a]\nn = 1\n");
        assert_eq!(d.key.as_deref(), Some("a.name"));
        assert_eq!(d.message, "missing key");
        assert_eq!(d.line, Some(1));
        let d = diag::<Doc>("x = 1\n");
        assert!(d.message.starts_with("unknown key"), "{d:?}");
        let d = diag::<Doc>("");
        assert_eq!(d.key.as_deref(), Some("a"));
    }

    #[test]
    fn a_key_that_does_not_look_like_one_is_hidden() {
        let d = diag::<Doc>("[a]\nname = \"x\"\nQUJDsecretZ = 1\n");
        assert_eq!(d.key.as_deref(), Some("a.<hidden>"));
        let d = diag::<Doc>("[a]\nname = \"x\"\nQUJD=\n");
        assert_eq!(d.key.as_deref(), Some("a.<hidden>"));
        assert!(!format!("{d:?}").contains("QUJD"));
    }

    #[test]
    fn syntax_errors_are_placed_by_line() {
        let d = diag::<Doc>("[a]\nname = \"unterminated\nn = 1\n");
        assert_eq!((d.line, d.key.as_deref()), (Some(2), Some("a.name")));
        assert!(!d.message.contains("unterminated"));
        let d = diag::<Doc>("[a]\nname = \"x\"\nname = \"y\"\n");
        assert_eq!((d.line, d.key.as_deref()), (Some(3), Some("a.name")));
        assert_eq!(d.message, "duplicate key");
        let d = diag::<Doc>("[[list]]\nv = \"a\"\n[[list]]\nv = \"b\n");
        assert_eq!(d.key.as_deref(), Some("list[1].v"));
        let d = diag::<Doc>("[a]\n[a]\n");
        assert_eq!((d.line, d.key.as_deref()), (Some(2), Some("a")));
    }

    #[test]
    fn sanitise_keeps_only_what_was_expected() {
        assert_eq!(
            sanitise("invalid type: string \"s, expected x\", expected a boolean"),
            "wrong type, expected a boolean"
        );
        assert_eq!(sanitise("missing value"), "missing value");
        assert_eq!(sanitise("something `SECRET` odd"), "invalid TOML");
        assert_eq!(sanitise("weird 123"), "invalid TOML");
        assert_eq!(
            sanitise("invalid type: integer `5`, expected struct RawComponent"),
            "wrong type, expected a table"
        );
    }

    #[test]
    fn locate_finds_values_and_falls_back_to_tables() {
        let text = "[a]\nname = \"x\"\nwords = [\"p\", \"q\"]\n";
        assert_eq!(locate(text, "a.name"), Some((2, 8)));
        assert_eq!(locate(text, "a.words[1]"), Some((3, 15)));
        assert_eq!(locate(text, "a.absent"), Some((1, 1)));
        assert_eq!(locate(text, "b.c"), None);
    }
}
