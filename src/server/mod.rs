//! The server: listeners, TLS accept, hyper connections (HTTP/1.1 and HTTP/2 by ALPN), the tower stack per
//! request, graceful shutdown and live reload. Everything a request needs is in one `Runtime`, swapped
//! atomically on reload so a bad config never replaces a good one and no connection is dropped.

mod certificates;
mod coalesce;
mod connection;
mod keepalive;
pub mod plain;
pub mod proxy_protocol;
mod stack;
mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::acme::{AcmeStatus, Http01Tokens};
use crate::body::BufferBudget;
use crate::config::{Config, ConfigError, Domains, TlsSource};
use crate::metrics::{Gauges, Metrics};
use crate::security::HandshakeFailureLog;
use crate::store::SharedStore;
use crate::tls::{CertResolver, TlsError};
use certificates::provision_certificates;
use stack::{Fixed, Runtime};
use workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Acme(String),
    #[error("signal handling: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

struct Shared {
    current: ArcSwap<Runtime>,
    resolver: Arc<CertResolver>,
    /// The served names, for the certificate source's background task (a reload may change them).
    domains: watch::Sender<Domains>,
    /// What every runtime of this server is built with, whatever its config.
    fixed: Fixed,
}

/// A started server. `shutdown` then `wait` stops it gracefully; dropping it also stops accepting and
/// lets connections drain, without waiting for them.
pub struct RunningServer {
    pub https_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// The local CA's root certificate, when `tls.source = "local"`.
    pub local_ca_root: Option<PathBuf>,
    /// What the ACME manager is doing, when `tls.source = "acme"`.
    pub acme_status: Option<Arc<AcmeStatus>>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    done: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    /// The worker threads connections are served on, when `server.workers > 1` under `run`.
    _workers: Option<Arc<Workers>>,
}

/// Binds the listeners, provisions certificates and starts serving, every connection on the calling
/// runtime (tests drive the server this way, paused clocks included).
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    start_on(config, None).await
}

/// As `start`, with connections served on `workers` when given (the binary with `workers > 1`).
async fn start_on(
    config: Config,
    workers: Option<Arc<Workers>>,
) -> Result<RunningServer, ServerError> {
    crate::tls::install_default_provider();
    for warning in &config.warnings {
        tracing::warn!("config: {warning}");
    }
    let config = Arc::new(config);
    let resolver = Arc::new(CertResolver::default());
    let tokens = Arc::new(Http01Tokens::default());

    let https_listener = bind(config.server.https)?;
    let http_listener = config.server.http.map(bind).transpose()?;
    let https_addr = https_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.server.https,
            source,
        })?;
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let metrics_listener = config.metrics.map(bind).transpose()?;
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let metrics = Arc::new(Metrics::default());
    let store = match &config.redis {
        Some(redis) => Some(SharedStore::open(redis, metrics.clone())?),
        None => None,
    };
    if let (Some(store), TlsSource::Local) = (&store, &config.tls.source) {
        certificates::share_local_ca(&config.tls.dir, store).await;
    }
    let mut background = Vec::new();
    let (domains, domain_updates) = watch::channel(config.server.domains.clone());
    let (local_ca_root, acme_status) = provision_certificates(
        &config,
        &resolver,
        &tokens,
        domain_updates,
        store.clone(),
        &mut background,
    )?;

    let tls_config =
        crate::tls::server_config(resolver.clone(), config.tls.source == TlsSource::Acme)?;
    let fixed = Fixed {
        store,
        tokens,
        https_port: https_addr.port(),
        metrics: metrics.clone(),
        budget: BufferBudget::new(config.limits.buffer_memory),
        handshake_failures: HandshakeFailureLog::new(Duration::from_secs(60)),
    };
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(Runtime::build(config.clone(), &fixed)),
        resolver,
        domains,
        fixed,
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(config.limits.max_connections));
    if let Some(listener) = metrics_listener {
        let (shared, permits, acme_status) = (shared.clone(), permits.clone(), acme_status.clone());
        let max_connections = config.limits.max_connections;
        let render = move || {
            let backends = shared.current.load().proxy.backends();
            shared.fixed.metrics.render(&Gauges {
                backends,
                open_connections: max_connections - permits.available_permits(),
                max_connections,
                certificate_expiry: shared.resolver.not_after(),
                acme: acme_status.as_ref().map(|status| status.snapshot()),
            })
        };
        background.push(tokio::spawn(crate::metrics::serve(listener, render)));
    }

    let mut loops = vec![tokio::spawn(accept_loop(
        https_listener,
        Some(TlsAcceptor::from(tls_config)),
        shared.clone(),
        shutdown_rx.clone(),
        permits.clone(),
        workers.clone(),
    ))];
    if let Some(listener) = http_listener {
        loops.push(tokio::spawn(accept_loop(
            listener,
            None,
            shared.clone(),
            shutdown_rx.clone(),
            permits.clone(),
            workers.clone(),
        )));
    }
    let grace = config.server.shutdown_grace;
    let done = tokio::spawn(drain(loops, permits, config.limits.max_connections, grace));

    tracing::info!(https = %https_addr, http = ?http_addr, metrics = ?metrics_addr, upstream = %config.upstream.describe(), "portcullis is serving");
    Ok(RunningServer {
        https_addr,
        http_addr,
        metrics_addr,
        local_ca_root,
        acme_status,
        shared,
        shutdown,
        done,
        background,
        _workers: workers,
    })
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let bind_error = |source| ServerError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    // Restarts must not fail on connections still in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(4096).map_err(bind_error)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
    workers: Option<Arc<Workers>>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the listener itself is fine.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the limit the connection is closed at once: cheaper than any work on it.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection limit reached; closing");
            shared.fixed.metrics.connection_refused();
            continue;
        };
        shared.fixed.metrics.connection_accepted();
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        let serve = move |tcp| async move {
            match tls {
                Some(acceptor) => {
                    connection::serve_tls(tcp, peer, acceptor, shared, stop, permit).await;
                }
                // Boxed: inline, its PROXY-header state would size every connection's task.
                None => Box::pin(connection::serve_plain(tcp, peer, shared, stop, permit)).await,
            }
        };
        match &workers {
            Some(workers) => workers.serve(tcp, serve),
            None => {
                tokio::spawn(serve(tcp));
            }
        }
    }
}

/// After shutdown is signalled and the accept loops have stopped, waits for every connection to close
/// (each finishes what is in flight), at most `grace`. Each open connection holds one permit.
async fn drain(
    loops: Vec<JoinHandle<()>>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    grace: Duration,
) {
    for accept in loops {
        let _ = accept.await;
    }
    let open = max_connections - permits.available_permits();
    if open > 0 {
        tracing::info!(open, grace = ?grace, "waiting for open connections to finish");
    }
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(grace = ?grace, "grace period over; closing the remaining connections");
    }
}

impl RunningServer {
    pub fn config(&self) -> Arc<Config> {
        self.shared.current.load().config.clone()
    }

    /// Applies a new, already validated config to requests from now on; new `server.domains` get their
    /// certificates from the running local CA or ACME manager. Settings bound at start (listen
    /// addresses, TLS source and folder, `[acme]`, worker threads, connection limit) need a restart: they
    /// are kept and named in the log. Certificate files that fail to load fail the reload as a whole.
    pub fn reload(&self, new: Config) -> Result<(), ServerError> {
        let old = self.config();
        let mut needs_restart = Vec::new();
        if new.server.https != old.server.https || new.server.http != old.server.http {
            needs_restart.push("server.https/server.http");
        }
        if new.tls.source != old.tls.source || new.tls.dir != old.tls.dir {
            needs_restart.push("tls.source/tls.dir");
        }
        if new.server.workers != old.server.workers {
            needs_restart.push("server.workers");
        }
        if new.tls.source == TlsSource::Acme && new.acme != old.acme {
            needs_restart.push("[acme]");
        }
        if new.limits.max_connections != old.limits.max_connections {
            needs_restart.push("limits.max_connections");
        }
        if new.metrics != old.metrics {
            needs_restart.push("metrics.listen");
        }
        if new.limits.buffer_memory != old.limits.buffer_memory {
            needs_restart.push("limits.buffer_memory");
        }
        if new.redis != old.redis {
            // The store is opened once, at start (and the local CA taken from it then).
            needs_restart.push("[storage]");
        }
        match &new.tls.source {
            TlsSource::Files { cert, key }
                if old.tls.source == new.tls.source
                    || matches!(old.tls.source, TlsSource::Files { .. }) =>
            {
                crate::tls::install_files(&self.shared.resolver, &new.server.domains, cert, key)?;
            }
            // The local CA's and the ACME manager's tasks issue for the new names (ACME: a new order
            // while the current certificate keeps serving).
            TlsSource::Local | TlsSource::Acme if new.tls.source == old.tls.source => {
                self.shared.domains.send_if_modified(|domains| {
                    let changed = *domains != new.server.domains;
                    *domains = new.server.domains.clone();
                    changed
                });
            }
            _ => {}
        }
        for warning in &new.warnings {
            tracing::warn!("config: {warning}");
        }
        if !needs_restart.is_empty() {
            tracing::warn!(keys = ?needs_restart, "these settings change only on restart; the rest is applied");
        }
        let runtime = Runtime::build(
            Arc::new(keep_restart_only_settings(new, &old)),
            &self.shared.fixed,
        );
        self.shared.current.store(Arc::new(runtime));
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Stops accepting connections; in-flight requests get `server.shutdown_grace` to finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until every connection is closed (after `shutdown`).
    pub async fn wait(self) {
        let _ = self.done.await;
        for task in self.background {
            task.abort();
        }
    }
}

/// The new config with the settings that only a restart changes put back as they run, so `config()`
/// reports what is in effect and the next reload compares against it.
fn keep_restart_only_settings(mut new: Config, running: &Config) -> Config {
    new.server.https = running.server.https;
    new.server.http = running.server.http;
    new.server.workers = running.server.workers;
    new.limits.max_connections = running.limits.max_connections;
    new.metrics = running.metrics;
    new.limits.buffer_memory = running.limits.buffer_memory;
    new.redis = running.redis.clone();
    if new.tls.source != running.tls.source || new.tls.dir != running.tls.dir {
        new.tls = running.tls.clone();
    }
    if running.tls.source == TlsSource::Acme {
        new.acme = running.acme.clone();
    }
    new
}

/// Runs until SIGTERM or SIGINT, taking the config `reload` gives on SIGHUP (the file `origin` names). A config that fails to load or apply
/// is logged and ignored: the running one keeps serving.
pub async fn run(
    config: Config,
    origin: &str,
    reload: impl Fn() -> Result<Config, ConfigError>,
) -> Result<(), ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;
    // Several workers: one single-thread runtime each (`server::workers`); this one keeps the accept
    // loops, signals and background tasks.
    let workers = match config.server.workers {
        1 => None,
        n => Some(Arc::new(Workers::start(n).map_err(ServerError::Workers)?)),
    };
    let server = start_on(config, workers).await?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                tracing::info!(config = origin, "SIGHUP: reloading");
                match reload() {
                    Ok(new) => {
                        if let Err(e) = server.reload(new) {
                            tracing::error!(error = %e, "reload failed; the previous config keeps serving");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "reload rejected; the previous config keeps serving"),
                }
            }
        }
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    server.shutdown();
    server.wait().await;
    tracing::info!("stopped");
    Ok(())
}
