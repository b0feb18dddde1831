//! The `portcullis` command: `run` serves, `check` validates a config without serving.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "HTTPS reverse proxy that puts the Django deployment checklist at the edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM/SIGINT; SIGHUP reloads the config and certificate files.
    Run {
        #[arg(long, short, default_value = "config/portcullis.toml")]
        config: PathBuf,
    },
    /// Validate a config and print the effective settings; exit 1 if it is invalid.
    Check {
        #[arg(long, short, default_value = "config/portcullis.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(parsed) => {
                println!("{}: OK", config.display());
                print!("{}", parsed.summary());
                for warning in &parsed.warnings {
                    println!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&config);
            // One worker: a current-thread runtime, with no work-stealing scheduler between the tasks of a
            // request (client connection, upstream connection) that wake each other constantly.
            let mut builder = if config.server.workers == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(config.server.workers);
                builder
            };
            let runtime = match builder.enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(portcullis::server::run(config, &path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}
