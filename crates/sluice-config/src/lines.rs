//! Field paths and the path -> source line map.
//!
//! Paths look like `apis[0].subscription.header_names[1]`: keys joined by
//! `.`, sequence indices in brackets. The line map is built from yaml-rust2's
//! marked events, independently of serde, so that every problem (unknown key,
//! type error, semantic problem) can be given a line.

use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Formats segments as a path string.
pub(crate) fn format_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
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

/// `parent.key` (or `key` at the top).
pub(crate) fn key_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub(crate) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// The path one step up; `None` at the top.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Path -> 1-based line of the key (mapping entries) or of the item
/// (sequence entries).
#[derive(Debug, Default)]
pub(crate) struct LineMap {
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize)>,
}

impl LineMap {
    /// Builds the map from `text`. A YAML syntax error leaves a partial map;
    /// serde_yaml reports the error itself.
    pub(crate) fn build(text: &str) -> LineMap {
        let mut builder = Builder {
            text_lines: text.lines().collect(),
            stack: Vec::new(),
            flow: Vec::new(),
            resume_line: 1,
            lines: HashMap::new(),
            duplicates: Vec::new(),
        };
        let mut parser = Parser::new_from_str(text);
        // Only the first document matters; more than one is an error
        // reported by serde_yaml.
        let _ = parser.load(&mut builder, false);
        LineMap {
            lines: builder.lines,
            duplicates: builder.duplicates,
        }
    }

    /// Mapping keys that appear twice in the same mapping: path and line of
    /// the second occurrence.
    pub(crate) fn duplicates(&self) -> &[(String, usize)] {
        &self.duplicates
    }

    /// The line of `path`, else of its nearest ancestor with a known line.
    pub(crate) fn line_of(&self, path: &str) -> Option<usize> {
        let mut current = path;
        loop {
            if let Some(line) = self.lines.get(current) {
                return Some(*line);
            }
            current = parent_path(current)?;
        }
    }
}

#[derive(Debug)]
enum Frame {
    /// `key` is the key whose value comes next, `None` while expecting a key.
    Map {
        path: String,
        key: Option<String>,
        seen: HashSet<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
    /// A complex (non-scalar) mapping key: nothing inside is recorded.
    Opaque,
}

#[derive(Debug)]
struct Builder<'t> {
    text_lines: Vec<&'t str>,
    stack: Vec<Frame>,
    /// Per open collection: whether it is a flow collection.
    flow: Vec<bool>,
    /// First line where the next node may start.
    resume_line: usize,
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize)>,
}

impl Builder<'_> {
    /// The line of a node. An empty node (`-` with nothing after it) is
    /// marked far after its `-`, so use the first line with content since
    /// the previous node ended instead.
    fn node_line(&self, ev: &Event, mark: &Marker) -> usize {
        let empty =
            matches!(ev, Event::Scalar(text, TScalarStyle::Plain, _, None) if text.is_empty());
        if !empty {
            return mark.line();
        }
        (self.resume_line..mark.line())
            .find(|&line| {
                let text = self
                    .text_lines
                    .get(line.wrapping_sub(1))
                    .copied()
                    .unwrap_or("");
                let text = text.trim_start();
                !text.is_empty() && !text.starts_with('#')
            })
            .unwrap_or(mark.line())
    }

    /// Whether the container starting at `mark` is a flow (`[...]`/`{...}`)
    /// collection.
    fn is_flow(&self, mark: &Marker) -> bool {
        let text = self
            .text_lines
            .get(mark.line().wrapping_sub(1))
            .copied()
            .unwrap_or("");
        matches!(text.chars().nth(mark.col()), Some('[' | '{'))
    }

    fn record_node(&mut self, path: &str, ev: &Event, mark: &Marker) -> usize {
        let line = self.node_line(ev, mark);
        if !path.is_empty() {
            self.lines.entry(path.to_string()).or_insert(line);
        }
        line
    }

    fn record(&mut self, path: &str, mark: &Marker) {
        // The document itself has no useful line: problems about missing
        // top-level keys are reported without one.
        if path.is_empty() {
            return;
        }
        self.lines.entry(path.to_string()).or_insert(mark.line());
    }

    /// Where a new node goes: `Some(path)` for a value, `None` for a mapping
    /// key or anything inside a complex key.
    fn place(&mut self, ev: &Event, mark: &Marker) -> Option<String> {
        let Some(top) = self.stack.last_mut() else {
            return Some(String::new());
        };
        match top {
            Frame::Opaque => None,
            Frame::Map { path, key, seen } => {
                if let Some(key) = key.take() {
                    return Some(key_path(path, &key));
                }
                let (new_key, line_path) = match ev {
                    Event::Scalar(text, ..) => (text.clone(), Some(key_path(path, text))),
                    _ => ("\u{0}complex-key".to_string(), None),
                };
                let duplicate = !seen.insert(new_key.clone());
                *key = Some(new_key);
                if let Some(line_path) = line_path {
                    if duplicate {
                        self.duplicates.push((line_path, mark.line()));
                    } else {
                        self.record(&line_path, mark);
                    }
                }
                None
            }
            Frame::Seq { path, next } => {
                let full = index_path(path, *next);
                *next += 1;
                Some(full)
            }
        }
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(..) | Event::Alias(..) => {
                let line = match self.place(&ev, &mark) {
                    Some(path) => self.record_node(&path, &ev, &mark),
                    None => mark.line(),
                };
                // Where the next node may start: after this one (block
                // scalars span the lines of their content).
                let extra = match &ev {
                    Event::Scalar(text, TScalarStyle::Literal | TScalarStyle::Folded, ..) => {
                        text.lines().count().saturating_sub(1)
                    }
                    _ => 0,
                };
                self.resume_line = line + extra + 1;
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let frame = match self.place(&ev, &mark) {
                    Some(path) => {
                        self.record(&path, &mark);
                        if matches!(ev, Event::MappingStart(..)) {
                            Frame::Map {
                                path,
                                key: None,
                                seen: HashSet::new(),
                            }
                        } else {
                            Frame::Seq { path, next: 0 }
                        }
                    }
                    None => Frame::Opaque,
                };
                self.stack.push(frame);
                self.flow.push(self.is_flow(&mark));
                self.resume_line = mark.line();
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                // A block collection ends at the next token (the next node
                // may be on that line); a flow one at its closing bracket.
                let flow = self.flow.pop().unwrap_or(false);
                self.resume_line = mark.line() + usize::from(flow);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_walks_paths() {
        let segs = [
            Seg::Key("apis".into()),
            Seg::Index(0),
            Seg::Key("subscription".into()),
            Seg::Key("header_names".into()),
            Seg::Index(1),
        ];
        let p = format_path(&segs);
        assert_eq!(p, "apis[0].subscription.header_names[1]");
        assert_eq!(parent_path(&p), Some("apis[0].subscription.header_names"));
        assert_eq!(parent_path("apis[0]"), Some("apis"));
        assert_eq!(parent_path("apis"), Some(""));
        assert_eq!(parent_path(""), None);
    }

    #[test]
    fn lines_are_one_based_and_point_at_keys_and_items() {
        let text = "\
service_name: x
server:
  listen: 1.2.3.4:5
apis:
  - name: a
    backends: [b1, b2]
  -
    name: c
    backends:
      - d1
      - d2
flow: {a: 1, b: {c: 2}}
";
        let map = LineMap::build(text);
        assert_eq!(map.line_of("service_name"), Some(1));
        assert_eq!(map.line_of("server"), Some(2));
        assert_eq!(map.line_of("server.listen"), Some(3));
        assert_eq!(map.line_of("apis"), Some(4));
        assert_eq!(map.line_of("apis[0]"), Some(5));
        assert_eq!(map.line_of("apis[0].name"), Some(5));
        assert_eq!(map.line_of("apis[0].backends[1]"), Some(6));
        assert_eq!(map.line_of("apis[1]"), Some(8));
        assert_eq!(map.line_of("apis[1].name"), Some(8));
        assert_eq!(map.line_of("apis[1].backends[1]"), Some(11));
        assert_eq!(map.line_of("flow.b.c"), Some(12));
        // Unknown paths fall back to the nearest known ancestor.
        assert_eq!(map.line_of("apis[1].nothing.here"), Some(8));
        assert_eq!(map.line_of("missing"), None);
    }

    #[test]
    fn empty_items_and_duplicate_keys() {
        let text = "\
list:
  - a
  -
  # comment

  -   # trailing
other: 1
other: 2
";
        let map = LineMap::build(text);
        assert_eq!(map.line_of("list[1]"), Some(3));
        assert_eq!(map.line_of("list[2]"), Some(6));
        assert_eq!(map.line_of("other"), Some(7));
        assert_eq!(map.duplicates(), &[("other".to_string(), 8)]);

        let text = "\
list:
  - name: x
    other:
  -
  - [a]
  -
  - b: |
      x
      y
  - |
    x
    y
  -
z: 1
";
        let map = LineMap::build(text);
        assert_eq!(map.line_of("list[1]"), Some(4));
        assert_eq!(map.line_of("list[3]"), Some(6));
        assert_eq!(map.line_of("list[6]"), Some(13));
    }

    #[test]
    fn complex_keys_and_aliases_do_not_confuse_the_walk() {
        let text = "\
a: &x {k: 1}
? [c, d]
: 5
b: *x
e: 2
";
        let map = LineMap::build(text);
        assert_eq!(map.line_of("a.k"), Some(1));
        assert_eq!(map.line_of("b"), Some(4));
        assert_eq!(map.line_of("e"), Some(5));
    }
}
