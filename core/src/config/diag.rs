//! Config diagnostics: one format for every error (`FILE:LINE:COL: KEY: message`), every
//! error of a file in one run, and a did-you-mean for misspelt keys and names.
//!
//! The YAML text is first read into an [`Outline`]: where each key path (`server.timeout`,
//! `backends[0].weight`) sits. Deserialization errors are mapped onto it; to find the next
//! one, the offending entry is blanked out of a working copy of the text (its bytes become
//! spaces, so every line and column stays put) and the text is read again.

use serde_saphyr::granit_parser::{Event, Parser};
use std::fmt;

/// One problem in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diag {
    /// 1-based; 0 when the place is not known (a value from the command line).
    pub line: u64,
    pub col: u64,
    /// The key path, e.g. `server.timeout` or `backends[0].url`.
    pub key: String,
    pub msg: String,
}

/// Every problem found in one config source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub diags: Vec<Diag>,
}

impl ConfigError {
    /// A single problem with no known place.
    pub fn plain(file: &str, key: &str, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            diags: vec![Diag {
                line: 0,
                col: 0,
                key: key.to_string(),
                msg: msg.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diags.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", self.file)?;
            if d.line > 0 {
                write!(f, ":{}:{}", d.line, d.col)?;
            }
            if d.key.is_empty() {
                write!(f, ": {}", d.msg)?;
            } else {
                write!(f, ": {}: {}", d.key, d.msg)?;
            }
        }
        if self.diags.len() > 1 {
            write!(f, "\n{}: {} errors", self.file, self.diags.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where one key (or list item) and its value sit.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    /// Map entries have a key; list items do not.
    keyed: bool,
    /// (line, col), both 1-based: the key (or the item) and the end of the value.
    at: (u64, u64),
    end: (u64, u64),
    /// Byte range of key and value, for blanking.
    bytes: (usize, usize),
}

/// The key paths of a YAML text and where each sits.
#[derive(Debug, Clone, Default)]
pub struct Outline {
    entries: Vec<Entry>,
    /// Keys given twice in one mapping: (path, line, col, first line).
    duplicates: Vec<(String, u64, u64, u64)>,
}

enum Frame {
    Map {
        path: String,
        key: Option<(String, (u64, u64), usize)>,
        seen: Vec<(String, u64)>,
        entry: Option<usize>,
    },
    Seq {
        path: String,
        idx: usize,
        entry: Option<usize>,
    },
}

fn pos(m: &serde_saphyr::granit_parser::Marker) -> (u64, u64) {
    (m.line() as u64, m.col() as u64 + 1)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Outline {
    /// Read the outline; a YAML syntax error comes back as a diagnostic.
    pub fn parse(src: &str) -> Result<Outline, Diag> {
        let mut out = Outline::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(src);
        while let Some(ev) = parser.next_event() {
            let (ev, span) = ev.map_err(|e| {
                let (line, col) = pos(e.marker());
                Diag {
                    line,
                    col,
                    key: String::new(),
                    msg: format!("invalid YAML: {}", e.info()),
                }
            })?;
            let start = pos(&span.start);
            let end = pos(&span.end);
            let (b0, b1) = (
                span.start.byte_offset().unwrap_or(0),
                span.end.byte_offset().unwrap_or(0),
            );
            let is_node = matches!(
                ev,
                Event::Scalar(..)
                    | Event::MappingStart(..)
                    | Event::SequenceStart(..)
                    | Event::Alias(..)
            );
            if is_node {
                // A mapping key?
                if let Some(Frame::Map {
                    key, seen, path, ..
                }) = stack.last_mut()
                {
                    if key.is_none() {
                        let name = match &ev {
                            Event::Scalar(v, ..) => v.to_string(),
                            _ => String::from("?"),
                        };
                        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == name) {
                            out.duplicates
                                .push((join(path, &name), start.0, start.1, *first));
                        } else {
                            seen.push((name.clone(), start.0));
                        }
                        *key = Some((name, start, b0));
                        if !matches!(ev, Event::Scalar(..)) {
                            // A complex key: skip its contents as a value of nothing.
                            stack.push(Frame::Seq {
                                path: String::new(),
                                idx: 0,
                                entry: None,
                            });
                        }
                        continue;
                    }
                }
                // A value: of a key, of a list item, or the document itself.
                let (path, keyed, at, from) = match stack.last_mut() {
                    Some(Frame::Map { path, key, .. }) => {
                        let (k, at, from) = key.take().unwrap_or_default();
                        (join(path, &k), true, at, from)
                    }
                    Some(Frame::Seq { path, idx, .. }) => {
                        let p = format!("{path}[{idx}]");
                        *idx += 1;
                        (p, false, start, b0)
                    }
                    None => (String::new(), false, start, b0),
                };
                let entry = (!path.is_empty()).then(|| {
                    out.entries.push(Entry {
                        path: path.clone(),
                        keyed,
                        at,
                        end,
                        bytes: (from, b1),
                    });
                    out.entries.len() - 1
                });
                match ev {
                    Event::MappingStart(..) => stack.push(Frame::Map {
                        path,
                        key: None,
                        seen: Vec::new(),
                        entry,
                    }),
                    Event::SequenceStart(..) => stack.push(Frame::Seq {
                        path,
                        idx: 0,
                        entry,
                    }),
                    _ => {}
                }
            } else if matches!(ev, Event::MappingEnd | Event::SequenceEnd) {
                let entry = match stack.pop() {
                    Some(Frame::Map { entry, .. }) | Some(Frame::Seq { entry, .. }) => entry,
                    None => None,
                };
                if let Some(i) = entry {
                    out.entries[i].end = end;
                    out.entries[i].bytes.1 = b1;
                }
            }
        }
        Ok(out)
    }

    /// Where `path` sits, or the nearest enclosing key that does; (0, 0) when nothing does.
    pub fn find(&self, path: &str) -> (u64, u64) {
        let mut p = path;
        loop {
            if let Some(e) = self.entries.iter().find(|e| e.path == p) {
                return e.at;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return (0, 0),
            }
        }
    }

    /// The deepest entry that holds (line, col); `keyed` restricts it to map entries.
    fn holding(&self, at: (u64, u64), keyed: bool) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|e| (!keyed || e.keyed) && e.at <= at && at <= e.end)
            .max_by_key(|e| e.at)
    }
}

/// Levenshtein distance, for did-you-mean.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// serde's "unknown field `x`, expected one of a, b" in trireme's words, with a guess.
fn reword(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((word, tail)) = rest.split_once('`') {
            let list = tail
                .trim_start_matches(", ")
                .trim_start_matches("expected one of ")
                .trim_start_matches("expected ");
            let names: Vec<&str> = list
                .split(", ")
                .flat_map(|s| s.split(" or "))
                .map(|s| s.trim_matches('`'))
                .filter(|s| !s.is_empty() && !s.starts_with("there are no"))
                .collect();
            return match did_you_mean(word, names.iter().copied()) {
                Some(m) => format!("unknown key `{word}`; did you mean `{m}`?"),
                None if names.is_empty() => {
                    format!("unknown key `{word}`: this section takes no keys")
                }
                None => format!("unknown key `{word}` (known keys: {})", names.join(", ")),
            };
        }
    }
    if let Some(k) = msg.strip_prefix("duplicate mapping key: ") {
        let k = k.split(',').next().unwrap_or(k);
        return format!("`{k}` is given twice");
    }
    if let Some(k) = msg.strip_prefix("missing field `") {
        return format!("missing key `{}`", k.trim_end_matches('`'));
    }
    msg.to_string()
}

/// Blank `bytes` of `text` (and a flow separator after them), keeping every line break.
fn blank(text: &mut [u8], (from, to): (usize, usize)) {
    let to = to.min(text.len());
    let mut end = to;
    while end < text.len() && text[end] == b' ' {
        end += 1;
    }
    let end = if end < text.len() && text[end] == b',' {
        end + 1
    } else {
        to
    };
    for b in &mut text[from.min(end)..end] {
        if *b != b'\n' && *b != b'\r' {
            *b = b' ';
        }
    }
}

/// What [`deserialize_all`] found.
pub struct Read<T> {
    /// The value, from the text with every entry in error blanked out (their defaults in
    /// their place), if it could be read at all.
    pub value: Option<T>,
    pub outline: Outline,
    pub diags: Vec<Diag>,
    /// Key paths blanked out: checks of the value say nothing new about them or their parents.
    pub blanked: Vec<String>,
}

impl<T> Read<T> {
    /// Whether a later check of `key` would only echo an error already reported.
    pub fn echoes(&self, key: &str) -> bool {
        self.blanked.iter().any(|b| related(b, key))
    }
}

/// `a` is `b`, or one holds the other.
fn related(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| {
        x.strip_prefix(y)
            .is_some_and(|r| r.is_empty() || r.starts_with('.') || r.starts_with('['))
    };
    inside(a, b) || inside(b, a)
}

/// Deserialize `src`, collecting every error (up to a bound) rather than the first.
pub fn deserialize_all<T: serde::de::DeserializeOwned>(src: &str) -> Read<T> {
    let outline = match Outline::parse(src) {
        Ok(o) => o,
        Err(d) => {
            return Read {
                value: None,
                outline: Outline::default(),
                diags: vec![d],
                blanked: Vec::new(),
            }
        }
    };
    let mut diags: Vec<Diag> = Vec::new();
    let mut text = src.as_bytes().to_vec();
    for (path, line, col, first) in &outline.duplicates {
        diags.push(Diag {
            line: *line,
            col: *col,
            key: path.clone(),
            msg: format!("given twice (first on line {first})"),
        });
        if let Some(e) = outline
            .entries
            .iter()
            .find(|e| e.keyed && e.at == (*line, *col))
        {
            blank(&mut text, e.bytes);
        }
    }
    let mut blanked: Vec<String> = outline.duplicates.iter().map(|d| d.0.clone()).collect();
    let mut value = None;
    let mut done: Vec<(u64, u64)> = Vec::new();
    for _ in 0..32 {
        let Ok(s) = std::str::from_utf8(&text) else {
            break;
        };
        let e = match serde_saphyr::from_str::<T>(s) {
            Ok(v) => {
                value = Some(v);
                break;
            }
            Err(e) => e,
        };
        let inner = e.without_snippet();
        let (line, col) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let msg = match inner {
            serde_saphyr::Error::Message { msg, .. } => msg.clone(),
            other => {
                let t = other.to_string();
                t.strip_suffix(&format!(" at line {line}, column {col}"))
                    .unwrap_or(&t)
                    .to_string()
            }
        };
        let holder = outline.holding((line, col), false).map(|e| e.path.clone());
        let target = outline.holding((line, col), true).cloned();
        // A required key left out, or a section left empty, only because an earlier error
        // blanked it: not news.
        let echo = msg.strip_prefix("missing field `").is_some_and(|k| {
            let k = k.trim_end_matches('`');
            blanked.iter().any(|b| {
                b.rsplit('.').next() == Some(k)
                    && holder.as_deref().is_some_and(|h| b.starts_with(h))
            })
        }) || target.as_ref().is_some_and(|t| {
            blanked
                .iter()
                .any(|b| b.starts_with(&format!("{}.", t.path)))
        });
        if !echo {
            let key = match (msg.strip_prefix("missing field `"), &holder) {
                (Some(_), Some(h)) => h.clone(),
                _ => target.as_ref().map(|e| e.path.clone()).unwrap_or_default(),
            };
            diags.push(Diag {
                line,
                col,
                key,
                msg: reword(&msg),
            });
        }
        let Some(t) = target.filter(|t| !done.contains(&t.at)) else {
            break;
        };
        // Blank the entry holding the error (for a missing key: the item that lacks it).
        let victim = if echo || msg.starts_with("missing field") {
            holder
                .as_deref()
                .and_then(|h| outline.entries.iter().find(|e| e.path == h))
                .cloned()
                .unwrap_or(t)
        } else {
            t
        };
        if done.contains(&victim.at) {
            break;
        }
        blank(&mut text, victim.bytes);
        done.push(victim.at);
        blanked.push(victim.path);
    }
    diags.sort_by_key(|d| (d.line == 0, d.line, d.col));
    Read {
        value,
        outline,
        diags,
        blanked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outline_paths_and_places() {
        let src =
            "server:\n  listen: a\nbackends:\n  - url: x\n    weight: 2\n  - {url: y, weight: 3}\n";
        let o = Outline::parse(src).unwrap();
        assert_eq!(o.find("server.listen"), (2, 3));
        assert_eq!(o.find("backends[0].weight"), (5, 5));
        assert_eq!(o.find("backends[1].weight"), (6, 14));
        assert_eq!(o.find("backends[1].nothing"), (6, 5));
        assert_eq!(o.find("nowhere"), (0, 0));
    }

    #[test]
    fn guesses() {
        assert_eq!(
            did_you_mean("workrs", ["listen", "workers"]),
            Some("workers")
        );
        assert_eq!(did_you_mean("zzz", ["listen", "workers"]), None);
        assert_eq!(
            reword("unknown field `wieght`, expected one of url, weight, max_conns"),
            "unknown key `wieght`; did you mean `weight`?"
        );
    }
}
