//! The request stack: the tower layers every request passes through, outermost first, built once per
//! config into a `Runtime` that a reload swaps whole. Read this file to see what happens to a request.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tower::ServiceBuilder;

use super::plain::PlainHttpService;
use crate::acme::Http01Tokens;
use crate::config::{Config, Limits};
use crate::context::TrustedProxies;
use crate::metrics::{Listener, Metrics};
use crate::middleware::record::RecordResponse;
use crate::middleware::{
    CookieHardening, GateLayer, Gated, HostAllowlist, RateLimiter, RecordResponseLayer,
    RewriteHeaders, RewriteHeadersLayer, SecurityHeaderPolicy,
};
use crate::proxy::ProxyService;
use crate::static_files::{StaticFiles, StaticOrProxy};

type HttpsStack = RecordResponse<
    RewriteHeaders<
        RewriteHeaders<Gated<Gated<StaticOrProxy, RateLimiter>, HostAllowlist>, CookieHardening>,
        SecurityHeaderPolicy,
    >,
>;
type PlainStack = RecordResponse<RewriteHeaders<PlainHttpService, SecurityHeaderPolicy>>;

/// Everything the request path reads, built from one validated config.
pub(super) struct Runtime {
    pub(super) config: Arc<Config>,
    pub(super) https: HttpsStack,
    pub(super) plain: PlainStack,
    pub(super) builder: auto::Builder<TokioExecutor>,
    /// Plain HTTP is HTTP/1.1 only: no cleartext HTTP/2 (h2c) is offered to anyone.
    pub(super) plain_builder: auto::Builder<TokioExecutor>,
}

impl Runtime {
    /// `https_port` is the port the HTTPS listener is bound to (the config may say 0).
    pub(super) fn build(
        config: Arc<Config>,
        tokens: Arc<Http01Tokens>,
        https_port: u16,
        metrics: &Arc<Metrics>,
    ) -> Runtime {
        let public_https_port = config.server.public_https_port.unwrap_or(https_port);
        let https = ServiceBuilder::new()
            .layer(RecordResponseLayer::new(
                config.log.access,
                metrics.clone(),
                Listener::Https,
            ))
            .layer(RewriteHeadersLayer::new(SecurityHeaderPolicy::for_https(
                &config.headers,
            )))
            .layer(RewriteHeadersLayer::new(CookieHardening::new(
                config.cookies.clone(),
            )))
            .layer(GateLayer::new(HostAllowlist::new(
                config.server.domains.clone(),
            )))
            .layer(GateLayer::new(RateLimiter::new(
                config.rate_limits.clone(),
                TrustedProxies::new(config.server.trusted_proxies.clone()),
            )))
            .service(StaticOrProxy::new(
                StaticFiles::new(&config.static_files),
                ProxyService::new(&config, public_https_port),
            ));
        let plain = ServiceBuilder::new()
            .layer(RecordResponseLayer::new(
                config.log.access,
                metrics.clone(),
                Listener::Http,
            ))
            .layer(RewriteHeadersLayer::new(
                SecurityHeaderPolicy::for_plain_http(&config.headers),
            ))
            .service(PlainHttpService::new(
                config.server.domains.clone(),
                public_https_port,
                config.server.health_path.clone(),
                tokens,
            ));
        Runtime {
            builder: connection_builder(&config.limits),
            plain_builder: connection_builder(&config.limits).http1_only(),
            https,
            plain,
            config,
        }
    }
}

fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Also bounds how long an idle keep-alive connection may wait before its next request.
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
        .max_local_error_reset_streams(limits.h2_max_pending_resets)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
