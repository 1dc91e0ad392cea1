//! ingestd: runs the NATS JetStream → PostgreSQL pipelines declared in
//! `pipelines/*.yaml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod backfill;
mod config;
mod dbcheck;
mod deadletter;
mod direct;
mod engine;
mod event;
mod health;
mod http;
mod lag;
mod metrics;
mod pipeline;
mod pipetest;
mod plan;
mod redact;
mod replay;
mod sink;
mod source;
mod sql;
mod sqlstate;
mod template;
mod validate;
mod watch;

const DEFAULT_DATABASE_URL: &str =
    "postgresql://postgres:postgres@localhost:5432/tiktok_events?schema=public";

#[derive(Parser)]
#[command(
    name = "ingestd",
    version,
    about = "Declarative NATS JetStream → PostgreSQL ingest engine",
    after_help = "Examples:\n  ingestd                         run every pipeline in ./pipelines\n  ingestd run --pipelines /etc/ingestd/pipelines\n  ingestd check pipelines/tiktok.yaml"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `run`'s options, for running without a subcommand.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run every pipeline of the pipelines directory (the default).
    #[command(
        after_help = "Environment: DATABASE_URL, NATS_URL, PORT, HOSTNAME, NODE_ENV, LOG_FORMAT, RUST_LOG.\n`.env` in the working directory is loaded first.\n\nExample:\n  DATABASE_URL=postgresql://postgres@127.0.0.1/app ingestd run --pipelines pipelines"
    )]
    Run(Box<RunArgs>),
    /// Check pipeline files (parse, environment, schema, template) without running them.
    #[command(
        after_help = "Exit status is 1 when any file has a problem; each is printed as file:line:column: message.\n\nExample:\n  ingestd check pipelines/"
    )]
    Check {
        /// Pipeline files or directories (default: pipelines/).
        paths: Vec<PathBuf>,
        /// Also plan every statement against the database (no writes) and
        /// show which write path each takes.
        #[arg(long)]
        db: bool,
        #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
        database_url: String,
    },
    /// Run pipeline unit tests (NAME.test.yaml beside each pipeline) against a real database.
    #[command(
        after_help = "Each case's row is inserted inside a transaction that is rolled back.\nExit status is 1 when a case fails.\n\nExample:\n  DATABASE_URL=postgresql://postgres@127.0.0.1/app ingestd test pipelines/"
    )]
    Test {
        /// Test files, pipeline files or directories (default: pipelines/).
        paths: Vec<PathBuf>,
        #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
        database_url: String,
    },
    /// Print the JSON Schema of the pipeline file format (for editors).
    #[command(
        after_help = "Example:\n  ingestd schema > schemas/pipeline.schema.json\nPipeline files point at it with `# yaml-language-server: $schema=../schemas/pipeline.schema.json`."
    )]
    Schema,
    /// Exit 0 when the engine's /live answers (for container health checks).
    #[command(
        after_help = "Example (Dockerfile):\n  HEALTHCHECK CMD [\"ingestd\", \"healthcheck\"]"
    )]
    Healthcheck {
        #[arg(long, env = "PORT", default_value_t = 3001)]
        port: u16,
    },
    /// Publish events to JetStream and wait for the server to store them.
    #[command(
        after_help = "Each FILE is one message (stdin when none is given).\n\nExample:\n  ingestd publish raw.events.tiktok.top.video.view examples/events/top-video-view.json"
    )]
    Publish {
        subject: String,
        files: Vec<PathBuf>,
        #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222")]
        nats_url: String,
    },
    /// Re-publish dead letters to their original subjects (then delete them).
    #[command(
        after_help = "Example:\n  ingestd replay --dead-letters deadletter.tiktok --reason schema --dry-run"
    )]
    Replay(Box<replay::Args>),
    /// Re-read a stream from a sequence or a time into a pipeline, on a consumer of its own.
    #[command(
        after_help = "Example:\n  ingestd backfill pipelines/tiktok.yaml --from-time 2026-11-25T00:00:00Z"
    )]
    Backfill(Box<backfill::Args>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of pipeline files.
    #[arg(long, default_value = "pipelines")]
    pipelines: PathBuf,
    /// Default database of every pipeline (a pipeline may override it).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    database_url: String,
    #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222")]
    nats_url: String,
    /// HTTP port of /metrics and the health endpoints.
    #[arg(long, env = "PORT", default_value_t = 3001)]
    port: u16,
    /// HTTP listen address.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0")]
    listen_addr: std::net::IpAddr,
    /// NATS connection name (default: collector-$HOSTNAME, as the TTK collector).
    #[arg(long, env = "NATS_NAME")]
    nats_name: Option<String>,
    /// How long shutdown waits for in-flight batches (the process exits at
    /// most a few seconds later, whatever it is doing).
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    nats_auth: source::NatsAuth,
}

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    // The engine reports what it does; one-shot commands only problems.
    let running = matches!(cli.command, None | Some(Command::Run(_)));
    init_logging(if running { "info,sqlx=warn" } else { "warn" });
    let result = match cli.command {
        Some(Command::Check {
            paths,
            db,
            database_url,
        }) => return check(paths, db.then_some(database_url.as_str())),
        Some(Command::Run(args)) => run(*args),
        Some(Command::Healthcheck { port }) => healthcheck(port),
        Some(Command::Test {
            paths,
            database_url,
        }) => return pipeline_tests(paths, &database_url),
        Some(Command::Schema) => {
            println!("{:#}", config::json_schema());
            Ok(())
        }
        Some(Command::Publish {
            subject,
            files,
            nats_url,
        }) => publish(&nats_url, &subject, files),
        Some(Command::Replay(args)) => replay::main(*args),
        Some(Command::Backfill(args)) => backfill::main(*args),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let settings = engine::Settings {
        pipelines_dir: args.pipelines,
        database_url: args.database_url,
        nats_url: args.nats_url,
        nats_name: args
            .nats_name
            .unwrap_or_else(|| format!("collector-{hostname}")),
        nats_auth: args.nats_auth,
        listen: SocketAddr::new(args.listen_addr, args.port),
        shutdown_grace: args.shutdown_grace,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(engine::run(settings))
}

/// A plain HTTP/1.0 GET of /live: no HTTP client in the image needed.
fn healthcheck(port: u16) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"GET /live HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.lines().next().unwrap_or_default();
    anyhow::ensure!(status.contains(" 200 "), "/live answered `{status}`");
    Ok(())
}

/// Publishes each file as one message, confirmed by JetStream (so a
/// subject no stream captures is an error, not a silent loss).
fn publish(nats_url: &str, subject: &str, files: Vec<PathBuf>) -> anyhow::Result<()> {
    let payloads: Vec<Vec<u8>> = if files.is_empty() {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        vec![buf]
    } else {
        files
            .iter()
            .map(|f| std::fs::read(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display())))
            .collect::<Result<_, _>>()?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = async_nats::connect(nats_url).await?;
        let js = async_nats::jetstream::new(client);
        for payload in payloads {
            let ack = js
                .publish(subject.to_string(), payload.into())
                .await?
                .await?;
            println!(
                "published to {subject}: stream {} sequence {}",
                ack.stream, ack.sequence
            );
        }
        Ok(())
    })
}

fn pipeline_tests(paths: Vec<PathBuf>, database_url: &str) -> ExitCode {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("pipelines")]
    } else {
        paths
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(pipetest::run(&paths, database_url)));
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks files offline (everything but the database and NATS), and with
/// a database URL also every statement against the database.
fn check(paths: Vec<PathBuf>, database_url: Option<&str>) -> ExitCode {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("pipelines")]
    } else {
        paths
    };
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            match engine::pipeline_files(&p) {
                Ok(f) => files.extend(f),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            files.push(p);
        }
    }
    let mut failed = 0;
    for f in &files {
        let checked = match database_url {
            _ if pipetest::is_test_file(f) => pipetest::check(f)
                .map(|()| println!("{}: ok", f.display()))
                .map_err(|e| format!("{e:#}")),
            None => event::check_file(f)
                .map(|()| println!("{}: ok", f.display()))
                .map_err(|e| e.to_string()),
            Some(url) => check_against_db(f, url),
        };
        if let Err(e) = checked {
            eprintln!("{e}");
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} pipeline files have problems", files.len());
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn check_against_db(file: &std::path::Path, url: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match rt.block_on(dbcheck::check_file(file, url)) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{}: {n} statements cannot work", file.display())),
        Err(e) => Err(e.to_string()),
    }
}

/// Human-readable logs by default; JSON with LOG_FORMAT=json or
/// NODE_ENV=production (as the collector). RUST_LOG or LOG_LEVEL filter.
fn init_logging(default_filter: &str) {
    let filter = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("LOG_LEVEL"))
        .unwrap_or_else(|_| default_filter.into());
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json")
        || std::env::var("NODE_ENV").is_ok_and(|e| e == "production");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
