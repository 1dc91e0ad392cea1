//! ingestd: runs the NATS JetStream → PostgreSQL pipelines declared in
//! `pipelines/*.yaml`.
//!
//! The modules follow the data: a [`source`] delivers messages, a
//! [`transform`] turns each into a row, a [`sink`] writes the rows, and a
//! [`pipeline`] wires the three together; the [`topology`] owns the
//! running pipelines, [`http`] and [`telemetry`] report on them, [`config`]
//! describes them and [`cli`] is the command line. ARCHITECTURE.md gives
//! the dependency rules between them.

pub mod cli;
pub mod config;
pub mod http;
pub mod pipeline;
pub mod sink;
pub mod source;
pub mod statement;
pub mod telemetry;
pub mod topology;
pub mod transform;
pub mod util;

/// The dependency rules of ARCHITECTURE.md, checked on the source: each
/// top-level module uses only the modules listed for it, in its unit tests
/// too (a test that needs another module's code shows a rule is missing),
/// which also rules out cycles between them.
#[cfg(test)]
mod architecture {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Module → the modules it may use.
    const ALLOWED: [(&str, &[&str]); 11] = [
        ("util", &[]),
        ("statement", &[]),
        ("config", &["util"]),
        ("telemetry", &["config", "util"]),
        ("source", &["config", "telemetry", "util"]),
        ("sink", &["config", "statement", "telemetry", "util"]),
        ("transform", &["config", "statement", "util"]),
        (
            "pipeline",
            &[
                "config",
                "source",
                "statement",
                "transform",
                "sink",
                "telemetry",
                "util",
            ],
        ),
        (
            "topology",
            &["config", "pipeline", "source", "telemetry", "util"],
        ),
        ("http", &["topology", "telemetry", "util"]),
        (
            "cli",
            &[
                "config",
                "source",
                "statement",
                "transform",
                "sink",
                "pipeline",
                "topology",
                "telemetry",
                "http",
                "util",
            ],
        ),
    ];

    fn uses(dir: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                uses(&path, found);
                continue;
            }
            let code = std::fs::read_to_string(&path).expect("read a source file");
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let names = match rest.strip_prefix('{') {
                    Some(group) => group.split('}').next().unwrap_or_default(),
                    None => rest,
                };
                for name in names.split(',') {
                    let name: String = name
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    found.insert(name);
                    if rest.starts_with(|c: char| c != '{') {
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn modules_use_only_what_the_architecture_allows() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let allowed: BTreeMap<&str, &[&str]> = ALLOWED.into_iter().collect();
        let mut modules = BTreeSet::new();
        for entry in std::fs::read_dir(&src).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                modules.insert(path.file_name().unwrap().to_string_lossy().to_string());
            }
        }
        let listed: BTreeSet<String> = allowed.keys().map(|m| m.to_string()).collect();
        assert_eq!(modules, listed, "every top-level module has its rule");
        let mut broken = Vec::new();
        for module in &modules {
            let mut found = BTreeSet::new();
            uses(&src.join(module), &mut found);
            for used in found {
                if used != *module && !allowed[module.as_str()].contains(&used.as_str()) {
                    broken.push(format!("{module} uses {used}"));
                }
            }
        }
        assert!(broken.is_empty(), "not allowed: {broken:?}");
    }
}
