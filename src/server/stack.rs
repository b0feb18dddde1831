//! The request stack: the tower layers every request passes through, outermost first, built once per
//! config into a `Runtime` that a reload swaps whole. Read this file to see what happens to a request.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceBuilder;
use tower_http::compression::{Compression, CompressionBody};
use tower_http::map_response_body::MapResponseBody;

use super::plain::PlainHttpService;
use crate::acme::Http01Tokens;
use crate::body::{BufferBudget, ProxyBody};
use crate::config::{Config, Limits};
use crate::context::TrustedProxies;
use crate::metrics::{Listener, Metrics};
use crate::middleware::compress_whole::{CompressWhole, CompressWholeLayer};
use crate::middleware::compression::{
    BoxedCompressionBody, CompressWhen, box_compression_body_layer, compression_layer,
};
use crate::middleware::host::HostPorts;
use crate::middleware::record::RecordResponse;
use crate::middleware::{
    ClearSiteDataOnLogout, CookieHardening, CrossOriginGuard, CspCollector, CspCollectorLayer,
    Gated, Guarded, HostAllowlist, LoginLockout, Maintenance, RateLimit, RateLimitLayer,
    RateLimiter, RecordResponseLayer, RequestHeadCheck, RewriteHeaders, RewriteHeadersLayer,
    SecurityHeaderPolicy, gate_layer, guard_layer,
};
use crate::proxy::ProxyService;
use crate::security::HandshakeFailureLog;
use crate::static_files::{StaticFiles, StaticOrProxy};
use crate::store::SharedStore;

type HttpsStack = RecordResponse<
    MapResponseBody<
        Compression<
            CompressWhole<
                RewriteHeaders<
                    RewriteHeaders<
                        Gated<
                            Gated<
                                Gated<
                                    CspCollector<
                                        Guarded<
                                            Guarded<
                                                Guarded<
                                                    RateLimit<StaticOrProxy>,
                                                    ClearSiteDataOnLogout,
                                                >,
                                                LoginLockout,
                                            >,
                                            CrossOriginGuard,
                                        >,
                                    >,
                                    Maintenance,
                                >,
                                HostAllowlist,
                            >,
                            RequestHeadCheck,
                        >,
                        CookieHardening,
                    >,
                    SecurityHeaderPolicy,
                >,
            >,
            CompressWhen,
        >,
        fn(CompressionBody<ProxyBody>) -> BoxedCompressionBody,
    >,
>;
type PlainStack = RecordResponse<RewriteHeaders<PlainHttpService, SecurityHeaderPolicy>>;

/// What every `Runtime` of one server is built with, whatever its config: fixed at start.
pub(super) struct Fixed {
    pub(super) tokens: Arc<Http01Tokens>,
    /// The port the HTTPS listener is bound to (the config may say 0).
    pub(super) https_port: u16,
    pub(super) metrics: Arc<Metrics>,
    pub(super) budget: BufferBudget,
    /// Handshake failures for the security log, one line per interval.
    pub(super) handshake_failures: HandshakeFailureLog,
    /// The shared store (`[storage] backend = "redis"`); a change needs a restart.
    pub(super) store: Option<Arc<SharedStore>>,
}

/// Everything the request path reads, built from one validated config.
pub(super) struct Runtime {
    pub(super) config: Arc<Config>,
    pub(super) https: HttpsStack,
    pub(super) plain: PlainStack,
    /// HTTP/1.1 on TLS without `h2` in ALPN, and on the plain listener (which offers no cleartext
    /// HTTP/2, h2c, to anyone).
    pub(super) http1: http1::Builder,
    /// The proxy service inside `https`, for the backends' state in the metrics.
    pub(super) proxy: ProxyService,
    /// HTTP/2, only where ALPN chose `h2` (RFC 9113 §3.2).
    pub(super) http2: http2::Builder<TokioExecutor>,
}

impl Runtime {
    pub(super) fn build(config: Arc<Config>, fixed: &Fixed) -> Runtime {
        let metrics = &fixed.metrics;
        let public_https_port = config.server.public_https_port.unwrap_or(fixed.https_port);
        let https_host_ports = HostPorts {
            default: 443,
            public: Some(public_https_port),
        };
        let plain_host_ports = HostPorts {
            default: 80,
            public: None,
        };
        let trusted_proxies = TrustedProxies::new(config.server.trusted_proxies.clone());
        let proxy = ProxyService::new(&config, public_https_port, fixed.budget.clone());
        let https = ServiceBuilder::new()
            .layer(RecordResponseLayer::new(
                config.log.access,
                metrics.clone(),
                Listener::Https,
                trusted_proxies.clone(),
            ))
            .layer(box_compression_body_layer())
            .layer(compression_layer(&config.compression))
            .layer(CompressWholeLayer::new(&config.compression))
            .layer(RewriteHeadersLayer::new(SecurityHeaderPolicy::for_https(
                &config.headers,
            )))
            .layer(RewriteHeadersLayer::new(CookieHardening::new(
                config.cookies.clone(),
            )))
            .layer(gate_layer(RequestHeadCheck::new(config.limits.max_headers)))
            .layer(gate_layer(HostAllowlist::new(
                config.server.domains.clone(),
                https_host_ports,
            )))
            .layer(gate_layer(Maintenance::new(
                config.errors.maintenance_file.clone(),
                config.errors.maintenance_allow.clone(),
                config.errors.maintenance_retry_after,
                trusted_proxies.clone(),
            )))
            .layer(CspCollectorLayer::new(
                config.csp_reports.as_ref(),
                config.limits.body_timeout,
                trusted_proxies.clone(),
                metrics.clone(),
            ))
            .layer(guard_layer(CrossOriginGuard::new(
                config.cross_origin.clone(),
            )))
            .layer(guard_layer(LoginLockout::new(
                config.login_lockouts.clone(),
                trusted_proxies.clone(),
            )))
            .layer(guard_layer(ClearSiteDataOnLogout::new(
                config.headers.clear_site_data.clone(),
            )))
            .layer(RateLimitLayer::new(
                RateLimiter::new(config.rate_limits.clone(), trusted_proxies.clone()),
                fixed.store.clone(),
                metrics.clone(),
            ))
            .service(StaticOrProxy::new(
                StaticFiles::new(&config.static_files, &fixed.budget),
                proxy.clone(),
            ));
        let plain = ServiceBuilder::new()
            .layer(RecordResponseLayer::new(
                config.log.access,
                metrics.clone(),
                Listener::Http,
                trusted_proxies.clone(),
            ))
            .layer(RewriteHeadersLayer::new(
                SecurityHeaderPolicy::for_plain_http(&config.headers),
            ))
            .service(PlainHttpService::new(
                config.server.domains.clone(),
                plain_host_ports,
                public_https_port,
                config.server.health_path.clone(),
                fixed.tokens.clone(),
                fixed.store.clone(),
            ));
        Runtime {
            proxy,
            http1: http1_builder(&config.limits),
            http2: http2_builder(&config.limits),
            https,
            plain,
            config,
        }
    }
}

/// The protocol is known before the first byte is read (ALPN, or the plain listener), so each connection
/// gets its own protocol's builder instead of hyper-util's auto builder: that one waits for the HTTP/2
/// preface before any timer of hyper's runs, so a silent client held its connection for the idle timeout.
fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Off: hyper's timer runs whenever hyper waits for a head, idle keep-alive included, so it
        // closed idle connections at the header timeout. `server::connection` times each head from its
        // first byte instead, and the idle timeout bounds keep-alive.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
}

fn http2_builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
        .max_local_error_reset_streams(limits.h2_max_pending_resets)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // What one stream may have queued for a client that does not read (hyper's default is 400 KiB,
        // which let unread streams grow the proxy by half a MiB each).
        .max_send_buf_size(H2_SEND_BUFFER)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Bytes an HTTP/2 stream may queue beyond the chunk being sent (see `limits` in the README).
pub(super) const H2_SEND_BUFFER: usize = 16 * 1024;
