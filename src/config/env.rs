//! `${VAR}` expansion of pipeline files before they are parsed.
//!
//! Only the YAML outside comments is expanded: a commented-out example
//! such as `# url: ${OTHER_DATABASE_URL}` must not need its variable. The
//! expansion never adds or removes a line, so positions found in the
//! expanded text are those of the file.

/// Why a pipeline file's variables cannot be expanded, and on which line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct EnvError {
    /// 1-based.
    pub line: usize,
    pub kind: EnvErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvErrorKind {
    #[error("unterminated `${{`")]
    Unterminated,
    #[error("`${{{0}}}` is not a valid variable reference")]
    InvalidReference(String),
    #[error("environment variable `{0}` is not set (use ${{{0}:-default}})")]
    Unset(String),
    #[error("the value of `{0}` has a line break, which would move every line after it")]
    LineBreak(String),
}

/// Expands `${VAR}` and `${VAR:-default}` outside comments; `$${` stays a
/// literal `${`. An unset variable without default is an error, so a typo
/// cannot silently become an empty string.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    let mut lexer = Lexer::default();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let (code, comment) = line.split_at(lexer.comment_start(line));
        expand_line(code, &lookup, &mut out).map_err(|kind| EnvError { line: i + 1, kind })?;
        out.push_str(comment);
    }
    Ok(out)
}

/// Where YAML comments are, line by line: a `#` at the start of a line or
/// after whitespace, outside quoted scalars (which may span lines) and
/// block scalars (`|`, `>`), whose lines are all content.
#[derive(Default)]
struct Lexer {
    quote: Option<char>,
    block: Option<Block>,
}

/// An open block scalar.
#[derive(Clone, Copy)]
struct Block {
    /// The indentation of the line that opened it: its content is indented
    /// further.
    parent: usize,
    /// The indentation of its content, set by its first non-blank line
    /// (or its indentation indicator): a line indented less ends it.
    content: Option<usize>,
}

impl Lexer {
    /// The byte offset where `line`'s comment starts (its length when it
    /// has none).
    fn comment_start(&mut self, line: &str) -> usize {
        let body = line.trim_end_matches(['\n', '\r']);
        let indent = body.len() - body.trim_start_matches([' ', '\t']).len();
        if let Some(block) = &mut self.block {
            if body.trim().is_empty() {
                return line.len();
            }
            let content = *block.content.get_or_insert(indent);
            if indent > block.parent && indent >= content {
                return line.len();
            }
            self.block = None;
        }
        let mut prev: Option<char> = None;
        let mut chars = body.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match (self.quote, c) {
                (Some('\''), '\'') if chars.peek().map(|&(_, n)| n) == Some('\'') => {
                    chars.next();
                }
                (Some('"'), '\\') => {
                    chars.next();
                }
                (Some(q), c) if c == q => self.quote = None,
                (Some(_), _) => {}
                (None, '#') if prev.is_none_or(char::is_whitespace) => {
                    self.open_block(&body[..at], indent);
                    return at;
                }
                (None, '\'' | '"') if opens_scalar(prev_significant(&body[..at])) => {
                    self.quote = Some(c)
                }
                (None, _) => {}
            }
            prev = Some(c);
        }
        self.open_block(body, indent);
        line.len()
    }

    /// Starts a block scalar when the code of a line ends with its
    /// indicator (`|`, `>-`, `|2+`, ...) outside quotes.
    fn open_block(&mut self, code: &str, indent: usize) {
        if self.quote.is_some() {
            return;
        }
        let code = code.trim_end();
        let head = code.trim_end_matches(|c: char| c.is_ascii_digit() || c == '+' || c == '-');
        let indicators = &code[head.len()..];
        let Some(before) = head.strip_suffix(['|', '>']) else {
            return;
        };
        let indicators_ok = indicators.len() <= 2
            && indicators.chars().filter(|c| c.is_ascii_digit()).count() <= 1
            && indicators.chars().filter(|c| !c.is_ascii_digit()).count() <= 1;
        let at_value = matches!(before.trim_end().chars().last(), None | Some(':' | '-'))
            && (before.is_empty() || before.ends_with(char::is_whitespace));
        if indicators_ok && at_value {
            let explicit = indicators.chars().find_map(|c| c.to_digit(10));
            self.block = Some(Block {
                parent: indent,
                content: explicit.map(|n| indent + n as usize),
            });
        }
    }
}

/// The last character before `at` that is not whitespace.
fn prev_significant(before: &str) -> Option<char> {
    before.trim_end().chars().last()
}

/// A quote starts a quoted scalar where a value or key can start: at the
/// start of a line, or after `:`, `-`, `?`, `[`, `{` or `,`. (In `it's`
/// it is part of a plain scalar.)
fn opens_scalar(prev: Option<char>) -> bool {
    matches!(prev, None | Some(':' | '-' | '?' | '[' | '{' | ','))
}

/// Expands one line's code (a line without its comment).
fn expand_line(
    line: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), EnvErrorKind> {
    let mut rest = line;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after.find('}').ok_or(EnvErrorKind::Unterminated)?;
            out.push_str(&substitute(&after[..end], lookup)?);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(())
}

fn substitute(
    expr: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, EnvErrorKind> {
    let (name, default) = match expr.split_once(":-") {
        Some((n, d)) => (n, Some(d)),
        None => (expr, None),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(EnvErrorKind::InvalidReference(expr.to_string()));
    }
    let value = match (
        lookup(name).filter(|v| !v.is_empty() || default.is_none()),
        default,
    ) {
        (Some(v), _) => v,
        (None, Some(d)) => d.to_string(),
        (None, None) => return Err(EnvErrorKind::Unset(name.to_string())),
    };
    if value.contains(['\n', '\r']) {
        return Err(EnvErrorKind::LineBreak(name.to_string()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            "HASH" => Some("a # b".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        let out = expand_env(
            "a: ${SET}\nb: ${UNSET:-dflt}\nc: $${SET} $5\nd: ${EMPTY:-x}\n",
            env,
        )
        .unwrap();
        assert_eq!(out, "a: value\nb: dflt\nc: ${SET} $5\nd: x\n");
    }

    #[test]
    fn unset_variable_names_its_line() {
        let err = expand_env("a: 1\nb: ${NOPE}\n", env).unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(err.kind, EnvErrorKind::Unset("NOPE".into()));
    }

    #[test]
    fn comments_are_not_expanded() {
        let text = "# url: ${OTHER_DATABASE_URL}\na: ${SET} # or ${NOPE}\n  # ${NOPE}\n";
        assert_eq!(
            expand_env(text, env).unwrap(),
            "# url: ${OTHER_DATABASE_URL}\na: value # or ${NOPE}\n  # ${NOPE}\n"
        );
    }

    /// `#` starts a comment only after whitespace and outside quotes; a
    /// block scalar has no comments at all.
    #[test]
    fn hashes_that_are_not_comments_are_expanded_around() {
        for (text, expanded) in [
            ("u: pg://h/db#${SET}\n", "u: pg://h/db#value\n"),
            ("s: 'a # ${SET}'\n", "s: 'a # value'\n"),
            ("s: \"a \\\" # ${SET}\"\n", "s: \"a \\\" # value\"\n"),
            ("s: 'it''s # ${SET}'\n", "s: 'it''s # value'\n"),
            ("s: \"one\n  # ${SET}\"\n", "s: \"one\n  # value\"\n"),
            (
                "sql: |\n  SELECT 1 # ${SET}\n\n  # ${SET}\nnext: 1 # ${NOPE}\n",
                "sql: |\n  SELECT 1 # value\n\n  # value\nnext: 1 # ${NOPE}\n",
            ),
            (
                "sql: >- # ${NOPE}\n  # ${SET}\n",
                "sql: >- # ${NOPE}\n  # value\n",
            ),
            ("n: it's # ${NOPE}\n", "n: it's # ${NOPE}\n"),
            ("v: ${HASH} # ${NOPE}\n", "v: a # b # ${NOPE}\n"),
        ] {
            assert_eq!(expand_env(text, env).unwrap(), expanded, "{text:?}");
        }
    }

    #[test]
    fn values_with_line_breaks_are_refused() {
        let err = expand_env("a: 1\nb: ${X}\n", |_| Some("one\ntwo".into())).unwrap_err();
        assert_eq!(
            (err.line, err.kind),
            (2, EnvErrorKind::LineBreak("X".into()))
        );
    }

    /// The expansion as it was before comments were told apart: every line
    /// expanded whole. On text without comments the two must agree.
    fn reference(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, usize> {
        let mut out = String::new();
        for (i, line) in text.split_inclusive('\n').enumerate() {
            expand_line(line, &lookup, &mut out).map_err(|_| i + 1)?;
        }
        Ok(out)
    }

    /// Lines of YAML-ish text built from pieces that matter to the
    /// expander: references, defaults, escapes, quotes, block indicators.
    fn pieces(with_comments: bool) -> impl Strategy<Value = String> {
        let mut atoms = vec![
            "a",
            " ",
            "key: ",
            "- ",
            "${SET}",
            "${UNSET:-d}",
            "${EMPTY:-x}",
            "$${SET}",
            "$5",
            "${NOPE}",
            "'",
            "\"",
            "|",
            ">",
            "\\",
            ":",
            "{",
            "}",
            "\t",
            "é",
        ];
        if with_comments {
            atoms.extend(["#", " #", " # ${NOPE}"]);
        }
        let line = prop::collection::vec(prop::sample::select(atoms), 0..8)
            .prop_map(|parts| parts.concat());
        prop::collection::vec(line, 0..8)
            .prop_map(|lines| lines.iter().map(|l| format!("{l}\n")).collect::<String>())
    }

    /// A YAML mapping whose values hold what looks like comments but is
    /// not (`#` in quotes, in URLs, in block scalars), with comments
    /// (holding `%%`) after values, on lines of their own and inside
    /// blocks' indentation.
    fn yaml_with_comments() -> impl Strategy<Value = String> {
        let value = prop::sample::select(vec![
            " plain".to_string(),
            " a#b".to_string(),
            " pg://u@h/db#frag".to_string(),
            " 'q # not'".to_string(),
            " 'it''s # not'".to_string(),
            " \"d \\\" # not\"".to_string(),
            " it's".to_string(),
            " [a, 'b # c', \"d\"]".to_string(),
            " {k: 'v # w'}".to_string(),
            " \"one\n  # not, still the string\"".to_string(),
            " |\n  # not a comment\n\n  SELECT 1 # nor this".to_string(),
            " >-\n  folded # text".to_string(),
        ]);
        let comment = prop::sample::select(vec!["", " # %% after", " #%% x: 'y"]);
        let line = prop::sample::select(vec![
            "",
            "# %% own line\n",
            " # %% indented, less than blocks\n",
        ]);
        prop::collection::vec((line, value, comment), 1..8).prop_map(|entries| {
            entries
                .iter()
                .enumerate()
                .map(|(i, (before, value, comment))| {
                    // A block scalar's comment goes after its indicator;
                    // any other value's after its end.
                    match value.split_once('\n') {
                        Some((head, body)) if head.ends_with(['|', '-']) => {
                            format!("{before}k{i}:{head}{comment}\n{body}\n")
                        }
                        _ => format!("{before}k{i}:{value}{comment}\n"),
                    }
                })
                .collect()
        })
    }

    proptest! {
        // Texts whose code has an unset reference or an open quote say
        // nothing about comments; they are generated again.
        #![proptest_config(ProptestConfig {
            max_global_rejects: 1 << 20,
            ..ProptestConfig::default()
        })]

        #[test]
        fn text_without_comments_expands_as_before(text in pieces(false)) {
            let new = expand_env(&text, env).map_err(|e| e.line);
            prop_assert_eq!(new, reference(&text, env));
        }

        #[test]
        fn expansion_keeps_every_line_and_every_comment(text in pieces(true)) {
            let out = expand_env(&text, env);
            prop_assume!(out.is_ok());
            let out = out.unwrap();
            prop_assert_eq!(out.lines().count(), text.lines().count());
            let (mut before, mut after) = (Lexer::default(), Lexer::default());
            for (raw, expanded) in text.lines().zip(out.lines()) {
                let raw_comment = &raw[before.comment_start(raw)..];
                let comment = &expanded[after.comment_start(expanded)..];
                prop_assert_eq!(raw_comment, comment);
            }
        }

        /// Against a YAML parser: what the lexer takes for comments is
        /// exactly the comments. Removing them leaves the same document,
        /// and every comment (marked `%%`, which nothing else holds) is
        /// found.
        #[test]
        fn the_comments_found_are_the_yaml_comments(text in yaml_with_comments()) {
            let mut lexer = Lexer::default();
            let stripped: String = text
                .split_inclusive('\n')
                .map(|l| {
                    let at = lexer.comment_start(l);
                    format!("{}\n", &l[..at].trim_end_matches('\n'))
                })
                .collect();
            prop_assert!(!stripped.contains("%%"), "a comment was missed:\n{}", text);
            let parse = |t: &str| yaml_rust2::YamlLoader::load_from_str(t).map_err(|e| e.to_string());
            prop_assert_eq!(parse(&stripped), parse(&text), "{}", text);
        }

        #[test]
        fn comment_text_is_never_expanded(code in pieces(false), comment in "[ -~]{0,20}") {
            let comment = format!("# ${{NOPE}} {comment}");
            let text: String = code.lines().map(|l| format!("{l} {comment}\n")).collect();
            let out = expand_env(&code, env);
            prop_assume!(out.is_ok());
            let want: String = out.unwrap().lines().map(|l| format!("{l} {comment}\n")).collect();
            // Only where the line's code closes its quotes is the `#` a comment.
            let mut lexer = Lexer::default();
            prop_assume!(text
                .lines()
                .all(|l| lexer.comment_start(l) == l.len() - comment.len()));
            prop_assert_eq!(expand_env(&text, env).unwrap(), want);
        }
    }
}
