//! The `portcullis` command: `run` serves a config file, `check` validates one without serving,
//! `reverse-proxy` serves with every default from a one-line start, `init` writes that start as a file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use portcullis::config::generate::{QuickStart, default_state_dir};
use portcullis::config::{Config, ConfigError, LogFormat};

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
        /// Also reach the shared store ([storage]) and say what is there.
        #[arg(long)]
        connect: bool,
    },
    /// Serve DOMAIN in front of Gunicorn with every default and no config file: ACME for public
    /// names, the local CA for localhost and IP addresses, HTTP redirected to HTTPS.
    ReverseProxy {
        #[command(flatten)]
        quick: QuickArgs,
        /// Print the equivalent config file and exit (move to it when you need more).
        #[arg(long)]
        print_config: bool,
    },
    /// Write the one-line start's config as a file to edit (refuses to overwrite one).
    Init {
        #[command(flatten)]
        quick: QuickArgs,
        #[arg(long, short, default_value = "portcullis.toml")]
        output: PathBuf,
    },
}

#[derive(Args)]
struct QuickArgs {
    /// A name to serve (repeat for more): the Host allowlist and the certificate's names.
    #[arg(long = "domain", required = true, value_name = "DOMAIN")]
    domains: Vec<String>,
    /// Where Gunicorn listens: 127.0.0.1:8000, :8000, http://host:port or unix:/path (repeat for more).
    #[arg(long = "to", required = true, value_name = "UPSTREAM")]
    upstreams: Vec<String>,
    /// Serve a folder at a URL instead of Gunicorn: STATIC_URL=STATIC_ROOT (repeat for more).
    #[arg(long = "static", value_name = "URL=DIR")]
    statics: Vec<String>,
    /// The HTTPS listener.
    #[arg(long, default_value = "0.0.0.0:443")]
    https: String,
    /// The plain listener (redirects, ACME HTTP-01); `off` for none.
    #[arg(long, default_value = "0.0.0.0:80")]
    http: String,
    /// Where certificates and keys are kept [default: $PORTCULLIS_STATE, $STATE_DIRECTORY,
    /// $XDG_DATA_HOME/portcullis or ~/.local/share/portcullis].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Contact address for the ACME account (expiry warnings).
    #[arg(long, value_name = "ADDRESS")]
    email: Option<String>,
    /// ACME directory: letsencrypt (default), letsencrypt-staging or an https:// URL.
    #[arg(long, value_name = "URL")]
    acme_directory: Option<String>,
    /// A PEM root to trust for the ACME directory (a private or test CA).
    #[arg(long, value_name = "FILE")]
    acme_ca: Option<PathBuf>,
}

impl QuickArgs {
    fn quick_start(self) -> QuickStart {
        QuickStart {
            domains: self.domains,
            upstreams: self.upstreams,
            https: self.https,
            http: (self.http != "off").then_some(self.http),
            statics: self.statics,
            state_dir: self
                .state
                .unwrap_or_else(|| default_state_dir(|key| std::env::var(key).ok())),
            contact: self.email,
            acme_directory: self.acme_directory,
            acme_directory_ca: self.acme_ca,
            command_line: std::env::args()
                .filter(|arg| arg != "--print-config")
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// The config text for a one-line start, or the reason there is none.
fn quick_config(quick: QuickArgs) -> Result<String, ExitCode> {
    quick.quick_start().toml().map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, connect } => match Config::load(&config) {
            Ok(parsed) => {
                println!("{}: OK", config.display());
                print!("{}", parsed.summary());
                for warning in &parsed.warnings {
                    println!("warning: {warning}");
                }
                match (&parsed.redis, connect) {
                    (Some(redis), true) => check_store(redis),
                    (None, true) => {
                        println!(
                            "store:    files in {} (nothing to connect to)",
                            parsed.tls.dir.display()
                        );
                        ExitCode::SUCCESS
                    }
                    _ => ExitCode::SUCCESS,
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => match Config::load(&path) {
            Ok(config) => serve(config, &path.display().to_string(), || Config::load(&path)),
            Err(e) => {
                eprintln!("error: {e}");
                if !path.exists() {
                    eprintln!("{}", missing_config_hint(&path));
                }
                ExitCode::FAILURE
            }
        },
        Command::ReverseProxy {
            quick,
            print_config,
        } => {
            let text = match quick_config(quick) {
                Ok(text) => text,
                Err(code) => return code,
            };
            if print_config {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            let parse = || Config::parse(&text, "reverse-proxy", None);
            match parse() {
                Ok(config) => {
                    // What runs, as a file: the way from here to a config of one's own.
                    println!("{text}");
                    serve(config, "the reverse-proxy options", parse)
                }
                Err(e) => {
                    eprintln!(
                        "error: {e}\n(in the config these options make; see it with --print-config)"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Init { quick, output } => {
            let text = match quick_config(quick) {
                Ok(text) => text,
                Err(code) => return code,
            };
            if let Err(e) = Config::parse(&text, &output.display().to_string(), None) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&output)
                .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()));
            match written {
                Ok(()) => {
                    println!(
                        "wrote {0}; check it with `portcullis check --config {0}`, serve it with `portcullis run --config {0}`",
                        output.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "error: {}: {e} (an existing file is never overwritten)",
                        output.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `check --connect`: reaches Redis once and says what it found; exit 1 if it cannot.
fn check_store(redis: &portcullis::config::RedisStorage) -> ExitCode {
    portcullis::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portcullis::store::probe(redis)) {
        Ok(report) => {
            println!(
                "store:    {} at {}: reachable, {} keys under {}",
                report.version, redis.url, report.keys, redis.key_prefix
            );
            println!(
                "acme:     {} account(s), {} certificate(s){}",
                report.accounts,
                report.certificates.len(),
                if report.certificates.is_empty() {
                    String::new()
                } else {
                    format!(": {}", report.certificates.join(", "))
                }
            );
            match &report.secrets {
                Some(secrets) if secrets.starts_with("error: ") => {
                    eprintln!("{secrets}");
                    return ExitCode::FAILURE;
                }
                Some(secrets) => println!("secrets:  {secrets}"),
                None => {}
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: `storage.url` {}: {e}", redis.url);
            ExitCode::FAILURE
        }
    }
}

/// What to do about a config file that is not there, in a container or not.
fn missing_config_hint(path: &std::path::Path) -> String {
    let shown = path.display();
    format!(
        "hint: write one (`portcullis init --domain example.com --to 127.0.0.1:8000`) and pass it with \
         --config FILE; in the container image, mount it read-only at {shown} \
         (`-v ./portcullis.toml:{shown}:ro`), and the state folder at /certs; or start without a file: \
         `portcullis reverse-proxy --domain example.com --to 127.0.0.1:8000`"
    )
}

/// Serves until SIGTERM/SIGINT; SIGHUP calls `reload` for the next config.
fn serve(
    config: Config,
    origin: &str,
    reload: impl Fn() -> Result<Config, ConfigError>,
) -> ExitCode {
    init_logging(&config);
    // A current-thread runtime: with one worker it serves everything, with more it keeps the accept
    // loops and background tasks and `server::run` starts one such runtime per worker for the
    // connections. No work-stealing scheduler sits between the tasks of a request (client connection,
    // upstream connection), which wake each other constantly.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portcullis::server::run(config, origin, reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
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
