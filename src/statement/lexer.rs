//! A small SQL lexer: finds the `$n` placeholders, the `VALUES (...)` tuple
//! and the target of a rendered insert, and the names a statement calls,
//! skipping string literals, dollar-quoted bodies and comments. It is what
//! lets the statement plan decide, without a SQL parser, whether a row
//! statement can be batched as one `UNNEST` insert; Postgres itself checks
//! everything else (describe).

use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(Range<usize>),
    Param(Range<usize>, usize),
    /// A double-quoted identifier, quotes included.
    Quoted(Range<usize>),
    Open(usize),
    Close(usize),
    Comma(usize),
    Semicolon(usize),
}

/// Lexes the parts of `sql` that matter here; literal and comment contents
/// are skipped, so a `$1` inside `'...'` is text, not a placeholder.
fn lex(sql: &str) -> Vec<Tok> {
    let b = sql.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        i = match c {
            b'\'' => {
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E') && !is_word(b, i - 1);
                skip_quoted(b, i, b'\'', escapes)
            }
            b'"' => {
                let end = skip_quoted(b, i, b'"', false);
                push(&mut toks, Tok::Quoted(i..end), end)
            }
            b'-' if b.get(i + 1) == Some(&b'-') => b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p),
            b'/' if b.get(i + 1) == Some(&b'*') => skip_block_comment(b, i),
            b'$' => lex_dollar(sql, i, &mut toks),
            b'(' => push(&mut toks, Tok::Open(i), i + 1),
            b')' => push(&mut toks, Tok::Close(i), i + 1),
            b',' => push(&mut toks, Tok::Comma(i), i + 1),
            b';' => push(&mut toks, Tok::Semicolon(i), i + 1),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let end = i + b[i..]
                    .iter()
                    .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$')
                    .count();
                push(&mut toks, Tok::Word(i..end), end)
            }
            _ => i + 1,
        };
    }
    toks
}

/// True when position `i` continues an identifier (so `e'..'` is not an
/// escape string when it ends a word such as `type'`).
fn is_word(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

fn push(toks: &mut Vec<Tok>, t: Tok, next: usize) -> usize {
    toks.push(t);
    next
}

fn skip_quoted(b: &[u8], start: usize, q: u8, backslash: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
        } else if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

fn skip_block_comment(b: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// `$12` is a placeholder; `$tag$ ... $tag$` and `$$ ... $$` are quoted bodies.
fn lex_dollar(sql: &str, i: usize, toks: &mut Vec<Tok>) -> usize {
    let b = sql.as_bytes();
    let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 {
        let end = i + 1 + digits;
        let n = sql[i + 1..end].parse().unwrap_or(usize::MAX);
        return push(toks, Tok::Param(i..end, n), end);
    }
    let tag_len = b[i + 1..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count();
    if b.get(i + 1 + tag_len) != Some(&b'$') {
        return i + 1;
    }
    let tag = &sql[i..i + tag_len + 2];
    let body = i + tag.len();
    sql[body..]
        .find(tag)
        .map_or(b.len(), |p| body + p + tag.len())
}

/// The placeholders of `sql` in order of appearance: (byte range, number).
pub fn placeholders(sql: &str) -> Vec<(Range<usize>, usize)> {
    lex(sql)
        .into_iter()
        .filter_map(|t| match t {
            Tok::Param(r, n) => Some((r, n)),
            _ => None,
        })
        .collect()
}

/// Where the single `VALUES (...)` tuple of an insert is, and its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValuesTuple {
    /// From the `VALUES` keyword to the closing parenthesis.
    pub span: Range<usize>,
    /// Each top-level expression inside the parentheses.
    pub items: Vec<Range<usize>>,
}

/// Finds the one top-level `VALUES (...)` tuple. None when there is none, or
/// several tuples, or an item is `DEFAULT` (which a SELECT cannot carry):
/// such statements are written row by row instead.
pub fn values_tuple(sql: &str) -> Option<ValuesTuple> {
    let toks = lex(sql);
    let mut depth = 0usize;
    let mut found = None;
    for (k, t) in toks.iter().enumerate() {
        match t {
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => depth = depth.saturating_sub(1),
            Tok::Word(r) if depth == 0 && sql[r.clone()].eq_ignore_ascii_case("values") => {
                if found.is_some() {
                    return None;
                }
                found = Some(k);
            }
            _ => {}
        }
    }
    let k = found?;
    let (Tok::Word(kw), Some(Tok::Open(open))) = (&toks[k], toks.get(k + 1)) else {
        return None;
    };
    let (items, close_k) = tuple_items(&toks, k + 1, *open)?;
    let Tok::Close(close) = toks[close_k] else {
        return None;
    };
    if matches!(toks.get(close_k + 1), Some(Tok::Comma(_))) {
        return None;
    }
    if items
        .iter()
        .any(|r| sql[r.clone()].trim().eq_ignore_ascii_case("default"))
    {
        return None;
    }
    Some(ValuesTuple {
        span: kw.start..close + 1,
        items,
    })
}

/// Splits the tuple opened at token `open_k` into its top-level items;
/// returns them and the index of the closing token.
fn tuple_items(toks: &[Tok], open_k: usize, open: usize) -> Option<(Vec<Range<usize>>, usize)> {
    let mut depth = 0usize;
    let mut items = Vec::new();
    let mut start = open + 1;
    for (k, t) in toks.iter().enumerate().skip(open_k) {
        match t {
            Tok::Open(_) => depth += 1,
            Tok::Comma(p) if depth == 1 => {
                items.push(start..*p);
                start = p + 1;
            }
            Tok::Close(p) => {
                depth -= 1;
                if depth == 0 {
                    items.push(start..*p);
                    return Some((items, k));
                }
            }
            _ => {}
        }
    }
    None
}

/// The statement without trailing semicolons (a template may end with
/// one; a statement embedded in a larger text must not).
pub fn trim_statement(sql: &str) -> &str {
    let mut end = sql.len();
    for t in lex(sql).iter().rev() {
        match t {
            Tok::Semicolon(p) => end = *p,
            _ => break,
        }
    }
    sql[..end].trim_end()
}

/// The first word of the statement, lower-cased (`insert`, `with`, ...).
pub fn first_word(sql: &str) -> Option<String> {
    match lex(sql).first() {
        Some(Tok::Word(r)) => Some(sql[r.clone()].to_ascii_lowercase()),
        _ => None,
    }
}

/// True when `word` (lower case) appears as a keyword or name anywhere
/// outside literals and comments.
pub fn has_word(sql: &str, word: &str) -> bool {
    lex(sql)
        .iter()
        .any(|t| matches!(t, Tok::Word(r) if sql[r.clone()].eq_ignore_ascii_case(word)))
}

/// The table an `INSERT INTO name ...` writes to, as written (possibly
/// schema-qualified and quoted), ready for `to_regclass`.
pub fn insert_target(sql: &str) -> Option<String> {
    let toks = lex(sql);
    let word = |k: usize| match toks.get(k) {
        Some(Tok::Word(r)) => Some(sql[r.clone()].to_ascii_lowercase()),
        _ => None,
    };
    if word(0)? != "insert" || word(1)? != "into" {
        return None;
    }
    let mut parts = Vec::new();
    for t in &toks[2..] {
        match t {
            Tok::Word(r)
                if !matches!(
                    sql[r.clone()].to_ascii_lowercase().as_str(),
                    "as" | "values" | "default" | "overriding" | "select"
                ) =>
            {
                parts.push(&sql[r.clone()])
            }
            Tok::Quoted(r) => parts.push(&sql[r.clone()]),
            _ => break,
        }
    }
    (!parts.is_empty()).then(|| parts.join("."))
}

/// Where a top-level `ON CONFLICT [target] DO NOTHING` clause is, from
/// `ON` to `NOTHING`: without it the statement is a plain insert that does
/// the same wherever no row conflicts, at less cost to the database.
pub fn on_conflict_do_nothing(sql: &str) -> Option<Range<usize>> {
    let toks = lex(sql);
    let is = |t: Option<&Tok>, word: &str| matches!(t, Some(Tok::Word(r)) if sql[r.clone()].eq_ignore_ascii_case(word));
    let mut depth = 0usize;
    let mut start = None;
    for (k, t) in toks.iter().enumerate() {
        match t {
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => depth = depth.saturating_sub(1),
            Tok::Word(r)
                if depth == 0
                    && start.is_none()
                    && is(Some(t), "on")
                    && is(toks.get(k + 1), "conflict") =>
            {
                start = Some(r.start);
            }
            Tok::Word(_) if depth == 0 && is(Some(t), "do") => {
                return match toks.get(k + 1) {
                    Some(Tok::Word(end)) if is(toks.get(k + 1), "nothing") => {
                        start.map(|s| s..end.end)
                    }
                    _ => None,
                };
            }
            _ => {}
        }
    }
    None
}

/// Every name followed by `(`: the functions a statement may call (and,
/// harmlessly, a table before its column list), unquoted; unquoted names
/// are folded to lower case as Postgres folds them.
pub fn called_names(sql: &str) -> Vec<String> {
    let toks = lex(sql);
    toks.windows(2)
        .filter_map(|w| match w {
            [Tok::Word(r), Tok::Open(_)] => Some(sql[r.clone()].to_ascii_lowercase()),
            [Tok::Quoted(r), Tok::Open(_)] => {
                Some(sql[r.start + 1..r.end - 1].replace("\"\"", "\""))
            }
            _ => None,
        })
        .collect()
}

/// Replaces each placeholder `$n` of `text` (a piece of `sql` starting at
/// `offset`) with `f(n)`.
pub fn replace_placeholders(
    sql: &str,
    piece: Range<usize>,
    marks: &[(Range<usize>, usize)],
    f: impl Fn(usize) -> String,
) -> String {
    let mut out = String::with_capacity(piece.len() + 16);
    let mut at = piece.start;
    for (r, n) in marks
        .iter()
        .filter(|(r, _)| r.start >= piece.start && r.end <= piece.end)
    {
        out.push_str(&sql[at..r.start]);
        out.push_str(&f(*n));
        at = r.end;
    }
    out.push_str(&sql[at..piece.end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSERT: &str = "INSERT INTO \"T\" (\"a\", \"b\", \"c\") VALUES ($1, $2::timestamptz AT TIME ZONE 'UTC', f($3, 'x,$9')) ON CONFLICT (\"a\") DO NOTHING";

    #[test]
    fn placeholders_skip_literals_and_comments() {
        let sql = "SELECT $1, '$2', \"$3\", $$ $4 $$, $tag$ $5 $tag$, E'\\' $6', $7 -- $8\n /* $9 /* $10 */ */ $11";
        let ns: Vec<usize> = placeholders(sql).into_iter().map(|(_, n)| n).collect();
        assert_eq!(ns, vec![1, 7, 11]);
    }

    #[test]
    fn finds_the_values_tuple_and_items() {
        let t = values_tuple(INSERT).unwrap();
        let items: Vec<&str> = t.items.iter().map(|r| INSERT[r.clone()].trim()).collect();
        assert_eq!(
            items,
            vec!["$1", "$2::timestamptz AT TIME ZONE 'UTC'", "f($3, 'x,$9')"]
        );
        assert!(INSERT[t.span.clone()].starts_with("VALUES ("));
        assert!(INSERT[t.span.end..].starts_with(" ON CONFLICT"));
    }

    #[test]
    fn multi_tuple_default_and_select_are_not_batchable() {
        assert!(values_tuple("INSERT INTO t VALUES ($1), ($2)").is_none());
        assert!(values_tuple("INSERT INTO t (a, b) VALUES (DEFAULT, $1)").is_none());
        assert!(values_tuple("INSERT INTO t SELECT $1").is_none());
    }

    #[test]
    fn statement_facts() {
        assert_eq!(
            trim_statement("INSERT INTO t VALUES (1) ; ;\n"),
            "INSERT INTO t VALUES (1)"
        );
        assert_eq!(trim_statement("SELECT ';'"), "SELECT ';'");
        assert_eq!(
            first_word("  with x AS (SELECT 1) SELECT 2").as_deref(),
            Some("with")
        );
        assert!(has_word("INSERT INTO t SELECT 1", "select"));
        assert!(!has_word("INSERT INTO t VALUES ('select')", "select"));
        assert_eq!(insert_target(INSERT).as_deref(), Some("\"T\""));
        assert_eq!(
            insert_target("insert into app.\"Ev\" AS e (a) VALUES ($1)").as_deref(),
            Some("app.\"Ev\"")
        );
        assert_eq!(insert_target("UPDATE t SET a = 1"), None);
        let names =
            called_names("INSERT INTO t (a) VALUES (lower($1), \"My\"\"Fn\"(2), coalesce(x, 1))");
        assert_eq!(names, vec!["t", "values", "lower", "My\"Fn", "coalesce"]);
    }

    #[test]
    fn finds_a_top_level_on_conflict_do_nothing() {
        let clause = |sql: &'static str| on_conflict_do_nothing(sql).map(|r| &sql[r]);
        assert_eq!(clause(INSERT), Some("ON CONFLICT (\"a\") DO NOTHING"));
        assert_eq!(
            clause("insert into t (a) values ($1) on conflict do nothing returning a"),
            Some("on conflict do nothing")
        );
        assert_eq!(
            clause("INSERT INTO t VALUES ($1) ON CONFLICT (lower(a)) WHERE b > 0 DO NOTHING"),
            Some("ON CONFLICT (lower(a)) WHERE b > 0 DO NOTHING")
        );
        assert_eq!(
            clause("INSERT INTO t VALUES ($1) ON CONFLICT ON CONSTRAINT t_pkey DO NOTHING"),
            Some("ON CONFLICT ON CONSTRAINT t_pkey DO NOTHING")
        );
        assert_eq!(
            clause("INSERT INTO t VALUES ($1) ON CONFLICT (a) DO UPDATE SET b = 1"),
            None
        );
        assert_eq!(
            clause("INSERT INTO t VALUES ($1) -- ON CONFLICT DO NOTHING"),
            None
        );
        assert_eq!(
            clause("INSERT INTO t VALUES ('ON CONFLICT DO NOTHING')"),
            None
        );
        assert_eq!(
            clause("WITH x AS (INSERT INTO u VALUES (1) ON CONFLICT DO NOTHING RETURNING 1) INSERT INTO t SELECT 1 FROM x"),
            None
        );
    }

    #[test]
    fn replaces_only_inside_the_piece() {
        let marks = placeholders(INSERT);
        let t = values_tuple(INSERT).unwrap();
        let out = replace_placeholders(INSERT, t.items[2].clone(), &marks, |n| format!("u.c{n}"));
        assert_eq!(out.trim(), "f(u.c3, 'x,$9')");
    }
}
