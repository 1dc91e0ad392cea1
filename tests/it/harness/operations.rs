//! Harness additions for the operations tests (`tests/it/operations.rs`): a
//! real Prometheus of the test's own (its own port, config and data dir)
//! scraping an engine every second and evaluating the shipped alert rules
//! every second, and Grafana's variable expansion for the shipped dashboard.
//!
//! Built on the rest of the harness.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use crate::harness::{
    adapt_pipeline, free_port, http_client, repo_file, spawn_logged, state, wait_for, TestEnv,
    DEADLINE,
};

/// Scrape and rule-evaluation interval of the test's Prometheus.
pub const SCRAPE_INTERVAL: &str = "1s";

/// Windows and `for:` durations of `examples/prometheus/alerts.yaml`, and
/// what the tests make of them: seconds instead of minutes, and a backlog
/// of a few messages counting as lag.
const RULE_SHORTENINGS: [(&str, &str); 8] = [
    ("for: 10m", "for: 1s"),
    ("for: 5m", "for: 1s"),
    ("for: 2m", "for: 1s"),
    ("for: 1m", "for: 1s"),
    ("< 300", "< 3"),
    ("[10m]", "[20s]"),
    ("offset 10m", "offset 20s"),
    ("> 1000", "> 5"),
];

/// The shipped alert rules with [`RULE_SHORTENINGS`] applied.
pub fn shortened_rules() -> String {
    let pairs: Vec<(String, String)> = RULE_SHORTENINGS
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    adapt_pipeline(&repo_file("examples/prometheus/alerts.yaml"), &pairs)
}

/// A Prometheus server scraping one engine, killed on drop.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    log_path: PathBuf,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus with `rules` scraping `127.0.0.1:<target>` and
    /// waits until it is ready.
    pub async fn start(env: &TestEnv, target: u16, rules: &str) -> Self {
        let dir = env.fresh_dir("prometheus");
        std::fs::write(dir.join("rules.yaml"), rules).expect("write rules");
        let config = format!(
            "global: {{scrape_interval: {SCRAPE_INTERVAL}, evaluation_interval: {SCRAPE_INTERVAL}}}\n\
             rule_files: [rules.yaml]\n\
             scrape_configs:\n  - job_name: ingestd\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
        let port = free_port();
        let log_path = dir.join("prometheus.log");
        let mut command = Command::new("prometheus");
        command
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir);
        // Installed by scripts/services.sh (Debian's `prometheus` package).
        let prometheus = Self {
            child: spawn_logged(command, &log_path),
            port,
            log_path,
            http: http_client(),
        };
        wait_for("Prometheus to be ready", DEADLINE, || async {
            let url = format!("http://127.0.0.1:{port}/-/ready");
            let reply = prometheus
                .http
                .get(&url)
                .send()
                .await
                .map_err(state(&url))?;
            crate::harness::expect_eq(reply.status().as_u16(), 200)
        })
        .await;
        prometheus
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        let reply = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .map_err(state(&url))?;
        let body: Value = reply.json().await.map_err(state("JSON"))?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{path} {query:?}: {body}"))
        }
    }

    /// The instant query's result vector; Err when Prometheus refuses the
    /// query (a parse error).
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", promql)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `alert` fires (its `for:` passed) and returns the label
    /// sets it fires with.
    pub async fn wait_firing(&self, alert: &str) -> Vec<Value> {
        wait_for(&format!("alert {alert} to fire"), DEADLINE, || async {
            let data = self.api("alerts", &[]).await?;
            let all = data["alerts"].as_array().cloned().unwrap_or_default();
            let firing: Vec<Value> = all
                .iter()
                .filter(|a| a["labels"]["alertname"] == alert && a["state"] == "firing")
                .map(|a| a["labels"].clone())
                .collect();
            if firing.is_empty() {
                let names: Vec<String> = all
                    .iter()
                    .map(|a| format!("{}={}", a["labels"]["alertname"], a["state"]))
                    .collect();
                Err(format!("alerts: {names:?}"))
            } else {
                Ok(firing)
            }
        })
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            eprintln!("----- prometheus log -----\n{log}\n----- end -----");
        }
    }
}

/// Runs `promtool ARGS` with `stdin` as its input.
pub fn promtool(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(stdin)
        .expect("write promtool stdin");
    child.wait_with_output().expect("promtool output")
}

// ---------------------------------------------------------------------------
// Grafana
// ---------------------------------------------------------------------------

/// Every query of the dashboard's panels: (panel title, expression).
pub fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let panels = dashboard["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            targets.into_iter().map(move |t| {
                let expr = t["expr"].as_str().expect("target expr").to_owned();
                (title.clone(), expr)
            })
        })
        .collect()
}

/// Grafana's built-in variables at a 1 s scrape interval:
/// `$__rate_interval` is max(4 × scrape interval, `$__interval` + scrape
/// interval).
pub const GRAFANA_BUILTINS: [(&str, &str); 5] = [
    ("__rate_interval", "4s"),
    ("__interval", "1s"),
    ("__interval_ms", "1000"),
    ("__range", "5m"),
    ("__range_s", "300"),
];

/// Expands Grafana template variables as Grafana does: `${name}` and
/// `${name:format}`, `[[name]]` and `[[name:format]]`, and `$name` where
/// the name is the longest run of word characters after the `$` (so
/// `$prefix_events` names a variable `prefix_events`). An unknown variable
/// is an error, as it is a query Grafana would send with a literal `$`.
pub fn expand_grafana(expr: &str, vars: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let Some((name, used)) = variable_at(tail)? else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
            continue;
        };
        let value = vars
            .get(name)
            .ok_or_else(|| format!("unknown variable `{name}` in {expr}"))?;
        out.push_str(value);
        rest = &tail[used..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The variable reference at the start of `text` (which starts with `$`
/// or `[`): its name and the length of the reference; None when it is none.
fn variable_at(text: &str) -> Result<Option<(&str, usize)>, String> {
    for (open, close) in [("${", "}"), ("[[", "]]")] {
        if let Some(inner) = text.strip_prefix(open) {
            let end = inner
                .find(close)
                .ok_or_else(|| format!("unterminated variable in {text}"))?;
            let name = inner[..end].split(':').next().unwrap_or_default();
            return Ok(Some((name, open.len() + end + close.len())));
        }
    }
    let Some(inner) = text.strip_prefix('$') else {
        return Ok(None);
    };
    let len = inner
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    Ok((len > 0).then(|| (&inner[..len], len + 1)))
}

/// Writes `text` to `path`, creating its directory.
pub fn write_file(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("create dir");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
