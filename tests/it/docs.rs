//! The documentation's examples pass their own checks: every YAML snippet
//! of README.md and docs/ that is a whole pipeline file is run through
//! `ingestd check`, laid out as in the repository (`pipelines/` beside
//! `schemas/` and `migrations/`), with no variable of the environment that
//! the snippet only names in a comment.

use std::path::{Path, PathBuf};

use crate::harness::{ingestd_bin, repo_root, TestEnv, DEADLINE};

/// A variable the README's example names only in a comment
/// (`# url: ${OTHER_DATABASE_URL}`): `check` must pass without it.
const COMMENTED_VARIABLE: &str = "OTHER_DATABASE_URL";

/// One fenced `yaml` block of a Markdown file.
struct Snippet {
    file: PathBuf,
    line: usize,
    text: String,
}

/// Every ```` ```yaml ```` block of `markdown` (the text of `file`), with
/// the line its text starts on.
fn yaml_snippets(file: &Path, markdown: &str) -> Vec<Snippet> {
    let mut snippets = Vec::new();
    let mut open: Option<Snippet> = None;
    for (n, line) in markdown.lines().enumerate() {
        match open.as_mut() {
            None if line.trim_start().starts_with("```yaml") => {
                open = Some(Snippet {
                    file: file.to_path_buf(),
                    line: n + 2,
                    text: String::new(),
                });
            }
            None => {}
            Some(_) if line.trim_start().starts_with("```") => {
                snippets.extend(open.take());
            }
            Some(snippet) => {
                snippet.text.push_str(line);
                snippet.text.push('\n');
            }
        }
    }
    assert!(
        open.is_none(),
        "{}: a yaml block is not closed",
        file.display()
    );
    snippets
}

/// A whole pipeline file, not a fragment of one or a pipeline test file:
/// it names the pipeline, its source and its sink at the top level.
fn is_pipeline_file(yaml: &str) -> bool {
    ["name:", "source:", "sink:"]
        .iter()
        .all(|key| yaml.lines().any(|line| line.starts_with(key)))
}

/// README.md and every Markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    let mut files = vec![repo_root().join("README.md")];
    let mut dirs = vec![repo_root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read docs/") {
            let path = entry.expect("docs/ entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A directory laid out as the repository: `pipelines/` for the snippets,
/// the repository's `schemas/` and `migrations/` beside it.
fn layout(env: &TestEnv) -> PathBuf {
    let root = env.fresh_dir("docs");
    for dir in ["schemas", "migrations"] {
        std::os::unix::fs::symlink(repo_root().join(dir), root.join(dir))
            .unwrap_or_else(|e| panic!("link {dir}: {e}"));
    }
    let pipelines = root.join("pipelines");
    std::fs::create_dir(&pipelines).expect("create pipelines/");
    pipelines
}

async fn check(path: &Path) -> std::process::Output {
    let child = tokio::process::Command::new(ingestd_bin())
        .arg("check")
        .arg(path)
        .env_remove(COMMENTED_VARIABLE)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, child)
        .await
        .expect("check finishes")
        .expect("run ingestd check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pipeline_file_in_the_docs_passes_check() {
    let env = TestEnv::new().await;
    let pipelines = layout(&env);
    let snippets: Vec<Snippet> = documents()
        .iter()
        .flat_map(|doc| {
            let markdown = std::fs::read_to_string(doc)
                .unwrap_or_else(|e| panic!("read {}: {e}", doc.display()));
            yaml_snippets(doc, &markdown)
        })
        .filter(|s| is_pipeline_file(&s.text))
        .collect();
    let readme = repo_root().join("README.md");
    let in_readme = snippets.iter().filter(|s| s.file == readme).count();
    assert!(in_readme > 0, "no pipeline file found in README.md");
    assert!(
        snippets
            .iter()
            .any(|s| s.text.contains(&format!("${{{COMMENTED_VARIABLE}}}"))),
        "no snippet names ${{{COMMENTED_VARIABLE}}} in a comment any more"
    );
    let mut failures = Vec::new();
    for (n, snippet) in snippets.iter().enumerate() {
        let path = pipelines.join(format!("snippet-{n}.yaml"));
        std::fs::write(&path, &snippet.text).expect("write the snippet");
        let out = check(&path).await;
        if !out.status.success() {
            failures.push(format!(
                "{}:{}: {}{}",
                snippet.file.display(),
                snippet.line,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    eprintln!("{} pipeline files of the docs checked", snippets.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn snippets_are_found_and_told_apart() {
    let markdown = "text\n```yaml\nname: a\nsource: {}\nsink: {}\n```\n```sh\nname: b\n```\n\
                    ```yaml\nsource:\n  nats: {}\n```\n";
    let snippets = yaml_snippets(Path::new("doc.md"), markdown);
    assert_eq!(snippets.len(), 2);
    assert_eq!(snippets[0].line, 3);
    assert!(is_pipeline_file(&snippets[0].text));
    assert!(!is_pipeline_file(&snippets[1].text), "a fragment");
}
