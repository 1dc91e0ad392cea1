//! Prometheus scraping: the `/metrics` text format parsed, and the families
//! of the shipped pipeline.

use super::*;

/// The families of the shipped tiktok.yaml (prefix `collector`).
pub const RECEIVED: &str = "collector_events_received_total";
pub const PROCESSED: &str = "collector_events_processed_total";
pub const FAILED: &str = "collector_events_failed_total";

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(key, value)` of `labels` is among this sample's labels.
    pub fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }

    /// The label names, sorted.
    pub fn label_names(&self) -> Vec<&str> {
        self.labels.keys().map(String::as_str).collect()
    }
}

/// A parsed `/metrics` page: samples plus the `# TYPE` of each family.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut metrics = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if let (Some("TYPE"), Some(name), Some(kind)) =
                    (words.next(), words.next(), words.next())
                {
                    metrics.types.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.is_empty() {
                let sample = parse_sample(line)
                    .map_err(|e| format!("metrics line {}: {e}: {line}", n + 1))?;
                metrics.samples.push(sample);
            }
        }
        Ok(metrics)
    }

    /// The samples named `name` that carry at least `labels`.
    pub fn series<'a, 'b>(
        &'a self,
        name: &'b str,
        labels: &'b [(&'b str, &'b str)],
    ) -> impl Iterator<Item = &'a Sample> + 'b
    where
        'a: 'b,
    {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has_labels(labels))
    }

    /// Sum of the matching series; 0 when there are none (an absent counter
    /// is a zero counter).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // fold from +0.0: `sum()` of nothing is -0.0, which reads oddly.
        self.series(name, labels)
            .fold(0.0, |total, s| total + s.value)
    }

    /// The single matching series; panics (showing the page's series of that
    /// name) when there are none or several.
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> &Sample {
        let found: Vec<_> = self.series(name, labels).collect();
        match found.as_slice() {
            [one] => one,
            _ => panic!(
                "want exactly one {name} with {labels:?}, found {}; all {name}: {:#?}",
                found.len(),
                self.series(name, &[]).collect::<Vec<_>>()
            ),
        }
    }

    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' ', '\t'])
        .ok_or("no value after the name")?;
    let name = line[..name_end].to_owned();
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end + 1..])?
    } else {
        (BTreeMap::new(), &line[name_end..])
    };
    // A timestamp may follow the value; the format allows it.
    let value = rest.split_whitespace().next().ok_or("no value")?;
    Ok(Sample {
        name,
        labels,
        value: parse_value(value)?,
    })
}

/// Parses `k="v",k2="v2"}` (after the `{`); returns the labels and the text
/// after the `}`. Label values may escape `\\`, `\"` and `\n`.
fn parse_labels(mut text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = text.find('=').ok_or("label without '='")?;
        let key = text[..eq].trim().to_owned();
        let quoted = text[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let (value, rest) = unescape_until_quote(quoted)?;
        labels.insert(key, value);
        text = rest;
    }
}

fn unescape_until_quote(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, escaped)) => value.push(escaped),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value".into())
}

/// A sample value or `le` bound: a float, `+Inf`, `-Inf` or `NaN`.
pub fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|e| format!("value {text:?}: {e}")),
    }
}
