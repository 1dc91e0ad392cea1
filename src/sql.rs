//! A small SQL lexer: finds the `$n` placeholders and the `VALUES (...)` tuple
//! of a rendered insert, skipping string literals, quoted identifiers,
//! dollar-quoted bodies and comments. It is what lets one rendered row
//! statement become a batch statement without a SQL parser.

use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(Range<usize>),
    Param(Range<usize>, usize),
    Open(usize),
    Close(usize),
    Comma(usize),
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
            b'"' => skip_quoted(b, i, b'"', false),
            b'-' if b.get(i + 1) == Some(&b'-') => b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p),
            b'/' if b.get(i + 1) == Some(&b'*') => skip_block_comment(b, i),
            b'$' => lex_dollar(sql, i, &mut toks),
            b'(' => push(&mut toks, Tok::Open(i), i + 1),
            b')' => push(&mut toks, Tok::Close(i), i + 1),
            b',' => push(&mut toks, Tok::Comma(i), i + 1),
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
    fn replaces_only_inside_the_piece() {
        let marks = placeholders(INSERT);
        let t = values_tuple(INSERT).unwrap();
        let out = replace_placeholders(INSERT, t.items[2].clone(), &marks, |n| format!("u.c{n}"));
        assert_eq!(out.trim(), "f(u.c3, 'x,$9')");
    }
}
