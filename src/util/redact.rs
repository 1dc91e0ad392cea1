//! Keeping secrets out of logs, `/pipelines`, metrics and error messages:
//! passwords in URLs (user-info or a `password=` query parameter) are
//! replaced by `***`, and a secret a library may echo in its own error text
//! is cut out of that text.

use std::borrow::Cow;

/// Query parameters that carry a password (libpq's `password`, and the
/// spellings other clients accept).
const SECRET_PARAMETERS: [&str; 4] = ["password", "passwd", "pass", "sslpassword"];

const MASK: &str = "***";

/// The URL with its password (user-info or query parameter) replaced, for
/// logs and errors.
pub fn url(text: &str) -> String {
    let Ok(mut u) = url::Url::parse(text) else {
        return "<unparseable URL>".to_string();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some(MASK));
    }
    if u.query_pairs().any(|(k, _)| is_secret_parameter(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_parameter(&k) {
                    MASK.to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

fn is_secret_parameter(name: &str) -> bool {
    SECRET_PARAMETERS
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name))
}

/// The passwords of a URL, raw and percent-decoded (a library may quote
/// either).
fn secrets_of(text: &str) -> Vec<String> {
    let Ok(u) = url::Url::parse(text) else {
        return Vec::new();
    };
    let query = u
        .query_pairs()
        .filter(|(k, _)| is_secret_parameter(k))
        .map(|(_, v)| v.into_owned());
    let user_info = u.password().into_iter().flat_map(|p| {
        let decoded = percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned();
        [p.to_string(), decoded]
    });
    user_info.chain(query).filter(|s| !s.is_empty()).collect()
}

/// `message` with every password of `url` cut out.
pub fn secrets_in(message: &str, url: &str) -> String {
    scrub(message, &secrets_of(url)).into_owned()
}

/// `message` with each of `secrets` replaced by `***`.
pub fn scrub<'a>(message: &'a str, secrets: &[String]) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(message);
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), MASK));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_urls() {
        let shown = url("postgres://u:s%40cret@h/db?sslmode=disable&password=q1&PASSWORD=q2");
        assert!(!shown.contains("s%40cret") && !shown.contains("q1") && !shown.contains("q2"));
        assert!(
            shown.contains("sslmode=disable") && shown.contains("u:***@h"),
            "{shown}"
        );
        assert_eq!(url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn echoed_secrets_are_cut_out() {
        let u = "postgres://u:s%40cret@h/db?password=other";
        let msg = secrets_in("bad: s@cret, s%40cret and other", u);
        assert_eq!(msg, "bad: ***, *** and ***");
    }
}
