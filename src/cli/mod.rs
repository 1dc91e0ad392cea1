//! The command line: `run` (the default), `check`, `test`, `publish`,
//! `schema`, `healthcheck`, `replay`, `backfill` and `audit`, one module each.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{config, telemetry};

pub mod audit;
pub mod backfill;
pub mod check;
pub mod check_db;
pub mod compat;
pub mod healthcheck;
pub mod publish;
pub mod replay;
pub mod run;
pub mod test;

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
    run: run::RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run every pipeline of the pipelines directory (the default).
    #[command(
        after_help = "Environment: DATABASE_URL, NATS_URL, PORT, HOSTNAME, NODE_ENV, LOG_FORMAT, RUST_LOG.\n`.env` in the working directory is loaded first.\n\nExample:\n  DATABASE_URL=postgresql://postgres@127.0.0.1/app ingestd run --pipelines pipelines"
    )]
    Run(Box<run::RunArgs>),
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
        #[arg(long, env = "DATABASE_URL", default_value = compat::DATABASE_URL, hide_env_values = true)]
        database_url: String,
    },
    /// Run pipeline unit tests (NAME.test.yaml beside each pipeline) against a real database.
    #[command(
        after_help = "Each file's migrations and rows run inside a transaction that is rolled back\n(--apply-migrations applies the migrations for good first).\nExit status is 1 when a case fails.\n\nExample:\n  DATABASE_URL=postgresql://postgres@127.0.0.1/app ingestd test pipelines/"
    )]
    Test {
        /// Test files, pipeline files or directories (default: pipelines/).
        paths: Vec<PathBuf>,
        #[arg(long, env = "DATABASE_URL", default_value = compat::DATABASE_URL, hide_env_values = true)]
        database_url: String,
        /// Apply the pipelines' migrations for good before testing (by
        /// default they run inside the rolled-back transaction too).
        #[arg(long)]
        apply_migrations: bool,
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
        /// The engine's listen address: dialled as it is, or on loopback
        /// when it is every address (0.0.0.0, ::).
        #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0")]
        listen_addr: std::net::IpAddr,
    },
    /// Publish events to JetStream and wait for the server to store them.
    #[command(
        after_help = "Each FILE is one message (stdin when none is given).\n\nExample:\n  ingestd publish raw.events.tiktok.top.video.view examples/events/top-video-view.json"
    )]
    Publish(Box<publish::Args>),
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
    /// Compare a stream with a pipeline's exactly-once ledger: what was settled, what is missing.
    #[command(
        after_help = "Exit status is 1 when a message the durable acknowledged has no ledger entry\n(after --repair: when one is still missing); 2 when the audit could not run.\n\nExample:\n  ingestd audit pipelines/counters.yaml --since 2026-11-25T00:00:00Z --repair --metrics-file /var/lib/node_exporter/ingestd_audit.prom"
    )]
    Audit(Box<audit::Args>),
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    // The engine reports what it does; one-shot commands only problems.
    let running = matches!(cli.command, None | Some(Command::Run(_)));
    telemetry::logging::init(if running { "info,sqlx=warn" } else { "warn" });
    let result = match cli.command {
        Some(Command::Check {
            paths,
            db,
            database_url,
        }) => return check::main(paths, db.then_some(database_url.as_str())),
        Some(Command::Run(args)) => run::main(*args),
        Some(Command::Healthcheck { port, listen_addr }) => {
            // The error's text already holds its causes.
            return match healthcheck::main(listen_addr, port) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Test {
            paths,
            database_url,
            apply_migrations,
        }) => {
            let migrations = match apply_migrations {
                true => test::Migrations::Applied,
                false => test::Migrations::RolledBack,
            };
            return test::main(paths, &database_url, migrations);
        }
        Some(Command::Schema) => {
            println!("{:#}", config::json_schema());
            Ok(())
        }
        Some(Command::Publish(args)) => publish::main(*args),
        Some(Command::Replay(args)) => replay::main(*args),
        Some(Command::Backfill(args)) => backfill::main(*args),
        // 1 means something is missing: an audit that could not run is 2.
        Some(Command::Audit(args)) => {
            return audit::main(*args).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            })
        }
        None => run::main(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
