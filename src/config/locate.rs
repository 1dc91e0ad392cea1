//! Where each key of a pipeline file is, by its full key path, so that a
//! problem found after parsing points at the key it is about (and
//! `batch.max_bytes` is never taken for `stream.max_bytes`).

use std::collections::BTreeMap;

use yaml_rust2::parser::{Event, Parser};

/// A position in a file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// The position of every mapping key of a YAML document, by key path in
/// serde_yaml's notation (`sink.postgres.batch.max_bytes`,
/// `source.nats.stream.subjects[0]`), so that paths in serde's errors and
/// in the checks after parsing are looked up alike.
#[derive(Debug, Default, Clone)]
pub struct KeyPositions(BTreeMap<String, Position>);

/// One open collection while walking the document.
enum Open {
    /// A mapping at `path`, with the key whose value comes next.
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

impl KeyPositions {
    /// Reads the keys of `text` as far as it parses (a syntax error is
    /// reported by the parse proper; the keys before it are still found).
    pub fn of(text: &str) -> Self {
        let mut keys = BTreeMap::new();
        let mut open: Vec<Open> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        while let Ok((event, mark)) = parser.next_token() {
            let position = Position {
                line: mark.line(),
                column: mark.col() + 1,
            };
            match event {
                Event::StreamEnd => break,
                Event::Scalar(value, ..) => {
                    if let Some(Open::Map {
                        path,
                        key: key @ None,
                    }) = open.last_mut()
                    {
                        keys.entry(join(path, &value)).or_insert(position);
                        *key = Some(value);
                    } else {
                        value_done(&mut open);
                    }
                }
                Event::Alias(_) => value_done(&mut open),
                Event::MappingStart(..) => {
                    let path = child_path(&mut open);
                    open.push(Open::Map { path, key: None });
                }
                Event::SequenceStart(..) => {
                    let path = child_path(&mut open);
                    open.push(Open::Seq { path, next: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    open.pop();
                    value_done(&mut open);
                }
                _ => {}
            }
        }
        Self(keys)
    }

    /// The position of the key at `path`, or of its nearest ancestor that
    /// the file writes (a value left to its default is reported where its
    /// section is).
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(p) = self.0.get(path) {
                return Some(*p);
            }
            path = parent(path)?;
        }
    }

    /// The position of exactly this key, if the file writes it.
    pub fn exact(&self, path: &str) -> Option<Position> {
        self.0.get(path).copied()
    }
}

/// `path` without its last segment (`a.b[2]` → `a.b`, `a.b` → `a`).
fn parent(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    Some(&path[..cut])
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The path of a collection that starts here, as the value of the open
/// mapping's key or the open sequence's next item. A collection used as
/// a mapping key gets a path no key path can name.
fn child_path(open: &mut [Open]) -> String {
    match open.last_mut() {
        None => String::new(),
        Some(Open::Map { path, key: Some(k) }) => join(path, k),
        Some(Open::Map { path, key: None }) => format!("{path}?"),
        Some(Open::Seq { path, next }) => format!("{path}[{next}]"),
    }
}

/// A value of the innermost open collection is complete.
fn value_done(open: &mut [Open]) {
    match open.last_mut() {
        Some(Open::Map { key, .. }) => *key = None,
        Some(Open::Seq { next, .. }) => *next += 1,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_of_the_same_name_are_told_apart_by_their_path() {
        let text = "source:\n  nats:\n    stream: {name: s, max_bytes: 1GiB}\nsink:\n  postgres:\n    batch:\n      max_bytes: 1MiB\n    insert: |\n      max_bytes: no\nlist:\n  - a: 1\n  - [x, {b: 2}]\n";
        let keys = KeyPositions::of(text);
        let line = |p: &str| keys.exact(p).map(|p| p.line);
        assert_eq!(line("source.nats.stream.max_bytes"), Some(3));
        assert_eq!(line("sink.postgres.batch.max_bytes"), Some(7));
        assert_eq!(line("sink.postgres.insert"), Some(8));
        assert_eq!(line("list[0].a"), Some(11));
        assert_eq!(line("list[1][1].b"), Some(12));
        assert_eq!(
            keys.exact("sink.postgres.batch.max_bytes").unwrap().column,
            7
        );
        assert_eq!(
            keys.exact("source.nats.stream.max_bytes").unwrap().column,
            23
        );
        assert_eq!(
            keys.find("sink.postgres.batch.max_wait").map(|p| p.line),
            Some(6)
        );
        assert_eq!(keys.find("nothing.here"), None);
    }

    /// A generated YAML tree, written out in block or flow style per
    /// mapping.
    #[derive(Debug, Clone)]
    enum Node {
        Scalar(String),
        Map(Vec<(String, Node)>, bool),
        Seq(Vec<Node>),
    }

    fn node() -> impl Strategy<Value = Node> {
        let scalar = prop_oneof![
            "[a-z0-9 ]{1,6}".prop_map(|s| Node::Scalar(s.trim().to_string() + "v")),
            Just(Node::Scalar("'q # x'".into())),
            Just(Node::Scalar("\"d: e\"".into())),
        ];
        scalar.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                (
                    prop::collection::btree_map("[a-z_]{1,4}", inner.clone(), 1..5),
                    any::<bool>()
                )
                    .prop_map(|(m, flow)| Node::Map(m.into_iter().collect(), flow)),
                prop::collection::vec(inner, 1..4).prop_map(Node::Seq),
            ]
        })
    }

    /// Writes `node` as the value of a block mapping's key and records
    /// each key path's line. Flow mappings go on one line.
    fn write(
        node: &Node,
        path: &str,
        indent: usize,
        out: &mut String,
        lines: &mut Vec<(String, usize)>,
    ) {
        match node {
            Node::Scalar(s) => out.push_str(&format!(" {s}\n")),
            Node::Map(_, true) => {
                let line = current_line(out);
                out.push(' ');
                out.push_str(&flow(node, path, line, lines));
                out.push('\n');
            }
            Node::Map(entries, false) => {
                out.push('\n');
                for (k, v) in entries {
                    let p = join(path, k);
                    lines.push((p.clone(), current_line(out)));
                    out.push_str(&format!("{}{k}:", " ".repeat(indent)));
                    write(v, &p, indent + 2, out, lines);
                }
            }
            Node::Seq(items) => {
                out.push('\n');
                for (i, v) in items.iter().enumerate() {
                    out.push_str(&format!("{}- item{i}:", " ".repeat(indent)));
                    let p = format!("{path}[{i}]");
                    lines.push((format!("{p}.item{i}"), current_line(out)));
                    write(v, &format!("{p}.item{i}"), indent + 4, out, lines);
                }
            }
        }
    }

    /// The 1-based line the next character written to `out` is on.
    fn current_line(out: &str) -> usize {
        out.matches('\n').count() + 1
    }

    /// A node in flow style, on the line `line`.
    fn flow(node: &Node, path: &str, line: usize, lines: &mut Vec<(String, usize)>) -> String {
        match node {
            Node::Scalar(s) => s.clone(),
            Node::Map(entries, _) => {
                let parts: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| {
                        let p = join(path, k);
                        lines.push((p.clone(), line));
                        format!("{k}: {}", flow(v, &p, line, lines))
                    })
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
            Node::Seq(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| flow(v, &format!("{path}[{i}]"), line, lines))
                    .collect();
                format!("[{}]", parts.join(", "))
            }
        }
    }

    proptest! {
        /// For generated nested YAML, every key path is located on the
        /// line where its key is written.
        #[test]
        fn each_key_path_is_located_on_its_own_line(
            root in prop::collection::btree_map("[a-z_]{1,4}", node(), 1..5),
            comments in any::<bool>(),
        ) {
            let mut text = String::new();
            let mut lines = Vec::new();
            for (k, v) in &root {
                if comments {
                    text.push_str("# a comment: with a key\n");
                }
                lines.push((k.clone(), current_line(&text)));
                text.push_str(&format!("{k}:"));
                write(v, k, 2, &mut text, &mut lines);
            }
            let keys = KeyPositions::of(&text);
            for (path, line) in &lines {
                prop_assert_eq!(keys.exact(path).map(|p| p.line), Some(*line), "{}\n{}", path, text);
            }
        }
    }
}
