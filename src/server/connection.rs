//! One client connection from accept to close: the TLS handshake (bounded in time), then hyper serving
//! the tower stack over the protocol ALPN chose, until the client is done, sends no complete request
//! head within `limits.header_read_timeout` of connecting, idles past `limits.idle_timeout` with no
//! request in flight, or the server shuts down (then in-flight requests finish first).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::future::Either;
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, watch};
// tokio's clock, so the idle logic can be tested under paused time.
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::coalesce::{CoalescedWrites, PollTurn};
use super::keepalive::{Http1, Resting, wake};
use super::{Runtime, Shared};
use crate::body::{BodyObserver, ObservedBody};
use crate::config::TlsSource;
use crate::context::{ConnInfo, canonical_ip};
use crate::metrics::Metrics;
use crate::response::{Blame, ProxyFailure};
use crate::security::{EventPlace, SecurityCause, SecurityEvent, write_event};
use crate::store::SharedStore;
use crate::tls::{ACME_TLS_ALPN, CertResolver};

/// Requests in flight on one connection and when it last did anything, for the idle timeout; and when
/// the bytes of a head not yet parsed began to arrive, for the header timeout.
pub(super) struct Activity {
    started: Instant,
    /// Requests whose head hyper has parsed, ever.
    requests: AtomicU64,
    in_flight: AtomicUsize,
    last_millis: AtomicU64,
    /// Milliseconds since `started` (+1, so 0 means none) at which bytes arrived with no request in
    /// flight: the start of the next HTTP/1.1 head. Cleared when hyper hands that request over.
    head_started: AtomicU64,
    head_begins: tokio::sync::Notify,
    /// Bytes given to the connection and not yet flushed by it.
    unflushed: AtomicBool,
    /// The last request came with a body (HTTP/1.1: hyper may still be reading it).
    body_open: AtomicBool,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_millis: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            head_begins: tokio::sync::Notify::new(),
            unflushed: AtomicBool::new(false),
            body_open: AtomicBool::new(false),
        })
    }

    /// Whether hyper's HTTP/1.1 connection can be taken apart now with nothing lost: no request in
    /// flight, no next head begun, every byte written flushed, and no request body hyper may still be
    /// reading (the next connection would parse the rest of it as a head). So a connection whose last
    /// request had a body rests only after a bodiless one. Not before the first request: until then
    /// the first-head deadline decides.
    fn may_rest(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
            && !self.unflushed.load(Ordering::Relaxed)
            && !self.body_open.load(Ordering::Relaxed)
    }

    fn now_millis(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn touch(&self) {
        self.last_millis.store(self.now_millis(), Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Bytes came in. With nothing in flight they are the start of the next head (HTTP/1.1: a body
    /// only follows a head hyper has handed over, which counts as in flight).
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started
                .store(self.now_millis() + 1, Ordering::Relaxed);
            self.head_begins.notify_one();
        }
    }

    /// Resolves when a head has been arriving for `timeout` without becoming a request.
    async fn head_overdue(&self, timeout: Duration) {
        loop {
            let started = self.head_started.load(Ordering::Relaxed);
            if started == 0 {
                self.head_begins.notified().await;
                continue;
            }
            let deadline = self.started + Duration::from_millis(started - 1) + timeout;
            tokio::time::sleep_until(deadline).await;
            if self.head_started.load(Ordering::Relaxed) == started {
                return;
            }
        }
    }

    /// Resolves once the connection has had no request in flight for `idle` (`Quiet::Close`), or,
    /// with `rest_after`, for that long first (`Quiet::Rest`), a rest looked for no sooner than
    /// `rest_from`. One timer for both, so a busy connection's task polls one sleep, not two.
    pub(super) async fn quiet_for(
        &self,
        idle: Duration,
        rest_after: Option<Duration>,
        rest_from: Option<Instant>,
    ) -> Quiet {
        loop {
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                // A long response is not quiet: look again a whole step later.
                tokio::time::sleep(rest_after.map_or(idle, |rest| rest.min(idle))).await;
                continue;
            }
            let last =
                self.started + Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
            let now = Instant::now();
            if now >= last + idle {
                return Quiet::Close;
            }
            let mut next = last + idle;
            if let Some(rest) = rest_after {
                let due = rest_from.map_or(last + rest, |from| from.max(last + rest));
                if now >= due {
                    return Quiet::Rest;
                }
                next = next.min(due);
            }
            tokio::time::sleep_until(next).await;
        }
    }
}

/// What a connection's quiet calls for (`Activity::quiet_for`).
#[derive(Debug, PartialEq)]
pub(super) enum Quiet {
    /// HTTP/1.1: take hyper's connection apart, if nothing is unfinished.
    Rest,
    /// The idle timeout: close.
    Close,
}

/// Held by a response body: the request counts as in flight until the body is finished or dropped.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub type TrackedBody<B> = ObservedBody<B, InFlight>;

impl BodyObserver for InFlight {}

/// The client behind a PROXY protocol header, when `server.proxy_protocol` lists the peer; `None`: the
/// connection is refused (logged and counted) before TLS or HTTP sees a byte.
async fn client_of(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    runtime: &Runtime,
    shared: &Shared,
) -> Option<SocketAddr> {
    let server = &runtime.config.server;
    let timeout = runtime.config.limits.handshake_timeout;
    match super::proxy_protocol::client_address(tcp, peer, &server.proxy_protocol, timeout).await {
        Ok(client) => Some(client),
        Err(refused) => {
            match refused.reason {
                Some(reason) => {
                    tracing::warn!(%peer, reason = reason.as_str(), "PROXY protocol: {refused}; closing");
                    shared.fixed.metrics.proxy_header_refused(reason);
                }
                None => tracing::debug!(%peer, "PROXY protocol: {refused}"),
            }
            None
        }
    }
}

/// One HTTPS connection, start to end: the future its task runs.
///
/// The PROXY header and the handshake (3 KiB of state with their timers) run in a box freed once the
/// connection is up: inline, they would size the connection's task for its whole life, idle or not.
/// Not an `async fn` for the same reason: its arguments would stay in its state beside the box.
/// The box is dropped by the `let` that awaits it: in an `if let` scrutinee it lived until the
/// connection closed (3.3 KiB per connection, found by heaptrack on 10,000 idle connections).
pub fn serve_tls(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let accepting = Box::pin(accept_tls(tcp, peer, acceptor, shared, shutdown, permit));
    async move {
        let serving = accepting.await;
        if let Some(serving) = serving {
            serving.await;
        }
    }
}

/// PROXY header, TLS handshake: the connection's HTTP service, or `None` when it ends here (refused,
/// failed handshake, an ACME challenge handshake).
async fn accept_tls(
    mut tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let runtime = shared.current.load_full();
    let peer = client_of(&mut tcp, peer, &runtime, &shared).await?;
    let shared_challenges = shared
        .fixed
        .store
        .as_ref()
        .filter(|_| runtime.config.tls.source == TlsSource::Acme);
    let stream = match tokio::time::timeout(
        runtime.config.limits.handshake_timeout,
        handshake(tcp, &acceptor, &shared.resolver, shared_challenges),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            shared.fixed.metrics.handshake_failed();
            let reason = e.to_string();
            shared
                .fixed
                .handshake_failures
                .record(peer.ip(), &reason, std::time::Instant::now());
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            shared.fixed.metrics.handshake_failed();
            shared.fixed.handshake_failures.record(
                peer.ip(),
                "handshake timed out",
                std::time::Instant::now(),
            );
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    // RFC 8737 §3: the challenge handshake is the whole answer; no application data follows.
    if session.alpn_protocol() == Some(ACME_TLS_ALPN) {
        return None;
    }
    // Without ALPN a TLS client speaks HTTP/1.1 (RFC 7301 §3.2, RFC 9113 §3.2).
    let protocol = if session.alpn_protocol() == Some(b"h2") {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let info = ConnInfo {
        worker: super::workers::current(),
        peer,
        sni: session.server_name().map(Arc::from),
        tls: true,
        slot: Arc::new(permit),
        shutdown: shutdown.clone(),
        peer_value: crate::context::ip_value(peer.ip()),
    };
    Some(serve_http(
        stream,
        info,
        &runtime,
        shared,
        shutdown,
        |r| r.https.clone(),
        protocol,
    ))
}

/// The TLS handshake. With ACME and the shared store, the ClientHello is read first: a TLS-ALPN-01
/// validation for a challenge another replica's order published (the CA's connection may land on any
/// replica) is answered with the challenge certificate built from it (RFC 8737 §3). Every other
/// handshake goes on with the server's config.
async fn handshake(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    resolver: &CertResolver,
    shared_challenges: Option<&Arc<SharedStore>>,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let Some(store) = shared_challenges else {
        return acceptor.accept(tcp).await;
    };
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let hello = start.client_hello();
    let asks_for_challenge = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
    let theirs = hello
        .server_name()
        .filter(|name| asks_for_challenge && !resolver.has_challenge(name))
        .map(str::to_string);
    let mut config = acceptor.config().clone();
    if let Some(name) = theirs
        && let Some(challenge) = crate::acme::shared::shared_alpn_certificate(store, &name).await
    {
        config = crate::tls::challenge_server_config(Arc::new(challenge))
            .map_err(std::io::Error::other)?;
    }
    start.into_stream(config).await
}

pub async fn serve_plain(
    mut tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let runtime = shared.current.load_full();
    let Some(peer) = client_of(&mut tcp, peer, &runtime, &shared).await else {
        return;
    };
    let info = ConnInfo {
        worker: super::workers::current(),
        peer,
        sni: None,
        tls: false,
        slot: Arc::new(permit),
        shutdown: shutdown.clone(),
        peer_value: crate::context::ip_value(peer.ip()),
    };
    serve_http(
        tcp,
        info,
        &runtime,
        shared,
        shutdown,
        |r| r.plain.clone(),
        Protocol::Http1,
    )
    .await;
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

/// The connection's reads, noted in its `Activity`: bytes with nothing in flight start the header
/// clock for the next HTTP/1.1 head. hyper's own header timer starts when hyper begins waiting for a
/// head, so it also cut idle keep-alive connections at `header_read_timeout` instead of `idle_timeout`.
/// Writes are noted until flushed (a connection with unflushed bytes may not rest), and `prefix`
/// holds bytes read before the current hyper connection existed: what a resting connection woke on,
/// and what the last one had read but not parsed. They are read first.
pub(super) struct HeadClock<I> {
    io: I,
    activity: Arc<Activity>,
    pub(super) prefix: Bytes,
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadClock<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            self.activity.bytes_arrived();
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeadClock<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if matches!(flushed, std::task::Poll::Ready(Ok(()))) {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves HTTP on an accepted (and, for HTTPS, handshaken) connection until it closes.
///
/// Not an `async fn`: the hyper connection (which owns the TLS session and hyper's buffers) is boxed
/// here, before the first await, and only the box moves into the future. An `async fn` taking `io` by
/// value keeps a slot for it in its state besides the connection built from it, and `drive` a third:
/// 9 KiB of future per connection, idle or not, where one box of the connection's own size will do
/// (benches/idle.py). Each protocol's future is boxed too, so an HTTP/1.1 connection's task is not
/// sized for HTTP/2's.
fn serve_http<I, S, B>(
    io: I,
    info: ConnInfo,
    runtime: &Runtime,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    stack_of: fn(&Runtime) -> S,
    protocol: Protocol,
) -> impl Future<Output = ()> + Send + use<I, S, B>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<hyper::Request<Incoming>, Response = hyper::Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer = info.peer;
    let activity = Activity::new();
    let io = HeadClock {
        io,
        activity: activity.clone(),
        prefix: Bytes::new(),
    };
    let metrics = shared.fixed.metrics.clone();
    let service = tracked_service(info, shared, activity.clone(), stack_of);
    let deadlines = Deadlines {
        first_head: runtime.config.limits.header_read_timeout,
        idle: runtime.config.limits.idle_timeout,
        next_heads: matches!(protocol, Protocol::Http1),
    };
    match protocol {
        Protocol::Http1 => {
            let builder = runtime.http1.clone();
            let connection = wake(&builder, Resting { io, service });
            let http1 = Http1 {
                builder,
                peer,
                activity,
                deadlines,
                metrics,
            };
            Either::Left(Box::pin(http1.serve(connection, shutdown)))
        }
        Protocol::Http2 => {
            // HTTP/2 only: an HTTP/1.1 response is one write already, and holding it would cost a
            // poll.
            let turn = PollTurn::default();
            let mut connection = Box::pin(runtime.http2.serve_connection(
                TokioIo::new(CoalescedWrites::new(io, turn.clone())),
                service,
            ));
            Either::Right(Box::pin(async move {
                let mut shutdown = shutdown;
                let when = Drive {
                    peer,
                    activity: &activity,
                    deadlines,
                    turn: Some(&turn),
                    rest_after: None,
                };
                when.drive(&mut connection, &mut shutdown).await;
            }))
        }
    }
}

/// An HTTP/1.1 head hyper could not parse (or that overran `limits.max_header_bytes`) never became a
/// request, so no layer saw it: it goes to the security log from here. hyper has answered it with 400
/// or 431 already.
pub(super) fn note_malformed_head(metrics: &Metrics, peer: SocketAddr, error: &hyper::Error) {
    let cause = if error.is_parse_too_large() {
        SecurityCause::TooLarge
    } else if error.is_parse() {
        SecurityCause::Malformed
    } else {
        return;
    };
    metrics.security_event(cause);
    let event = SecurityEvent::with_detail(cause, format!("unparsable request head: {error}"));
    let place = EventPlace {
        client: Some(canonical_ip(peer.ip())),
        ..EventPlace::default()
    };
    write_event(&event, place, 1);
}

/// The hyper service for one connection: each request gets the connection's facts, runs through the
/// current runtime's stack (a reload applies from the next request) and counts as in flight until its
/// response body is done.
fn tracked_service<S, B>(
    info: ConnInfo,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    stack_of: fn(&Runtime) -> S,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<TrackedBody<B>>,
    Error = Infallible,
    Future = impl Future<Output = Result<hyper::Response<TrackedBody<B>>, Infallible>> + Send,
> + Clone
where
    S: tower::Service<hyper::Request<Incoming>, Response = hyper::Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send,
{
    service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        let in_flight = activity.begin();
        activity
            .body_open
            .store(!req.body().is_end_stream(), Ordering::Relaxed);
        let stack = stack_of(&shared.current.load());
        let http1 = req.version() < http::Version::HTTP_2;
        async move {
            let mut response = stack.oneshot(req).await?;
            // After a refused request the rest of an HTTP/1.x connection cannot be trusted (framing, an
            // unread body): close it. An HTTP/2 stream error leaves the connection sound.
            let refused = response
                .extensions()
                .get::<ProxyFailure>()
                .is_some_and(|f| f.blame == Blame::Client);
            if http1 && refused {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(response.map(|inner| ObservedBody::new(inner, in_flight)))
        }
    })
}

/// A hyper connection that can be asked to finish what is in flight and close. hyper-util's
/// `graceful::GracefulConnection` covers hyper's plain HTTP/1.1 connection but not the upgradeable one
/// that WebSocket needs, so this small trait stands in for it.
pub trait GracefulConnection: Future<Output = hyper::Result<()>> {
    fn begin_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E, B> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The two clocks a connection runs on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadlines {
    /// A connection that has not sent one complete request head by then is closed, whatever protocol
    /// it speaks (hyper's HTTP/1.1 header timer covers later requests; HTTP/2 has none of its own).
    first_head: Duration,
    pub(super) idle: Duration,
    /// HTTP/1.1: each later head must also arrive within `first_head` of its first byte. (HTTP/2 sends
    /// frames while idle, and its heads come in HEADERS frames hyper bounds by size.)
    next_heads: bool,
}

/// How a connection's run by `Drive::drive` ended.
pub(super) enum Driven {
    /// Closed, with hyper's error if it had one.
    Ended(Option<hyper::Error>),
    /// Idle for `rest_after` and nothing unfinished: hyper's connection can be taken apart.
    Resting,
}

/// What one connection is driven by: its clocks, and for HTTP/2 the write turn, for HTTP/1.1 when to
/// rest.
pub(super) struct Drive<'a> {
    pub(super) peer: SocketAddr,
    pub(super) activity: &'a Activity,
    pub(super) deadlines: Deadlines,
    /// Advanced on each poll of the connection, for its `CoalescedWrites`.
    pub(super) turn: Option<&'a PollTurn>,
    pub(super) rest_after: Option<Duration>,
}

impl Drive<'_> {
    /// Runs a connection until it ends or may rest; on idleness or server shutdown asks it to close
    /// after what is in flight (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`). A connection that never
    /// sent a request head is dropped outright: there is nothing in flight to finish.
    pub(super) async fn drive<C: GracefulConnection>(
        &self,
        connection: &mut Pin<Box<C>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Driven {
        let activity = self.activity;
        let (idle, rest_after) = (self.deadlines.idle, self.rest_after);
        let quiet = activity.quiet_for(idle, rest_after, None);
        let mut quiet = std::pin::pin!(quiet);
        let first_head = tokio::time::sleep(self.deadlines.first_head);
        let mut first_head = std::pin::pin!(first_head);
        let mut waiting_for_first_head = activity.requests.load(Ordering::Relaxed) == 0;
        let mut closing = false;
        loop {
            tokio::select! {
                result = std::future::poll_fn(|cx| {
                    if let Some(turn) = self.turn {
                        turn.advance();
                    }
                    connection.as_mut().poll(cx)
                }) => {
                    let error = result.err();
                    if let Some(e) = &error {
                        tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
                    }
                    return Driven::Ended(error);
                }
                _ = &mut first_head, if waiting_for_first_head => {
                    if activity.requests.load(Ordering::Relaxed) == 0 {
                        tracing::debug!(peer = %self.peer, "no request head within the header timeout; closing");
                        return Driven::Ended(None);
                    }
                    waiting_for_first_head = false;
                }
                _ = shutdown.wait_for(|stop| *stop), if !closing => {
                    connection.as_mut().begin_shutdown();
                    closing = true;
                }
                _ = activity.head_overdue(self.deadlines.first_head), if self.deadlines.next_heads => {
                    tracing::debug!(peer = %self.peer, "a request head took longer than the header timeout; closing");
                    return Driven::Ended(None);
                }
                due = &mut quiet, if !closing => {
                    match (due, rest_after) {
                        (Quiet::Rest, _) if activity.may_rest() => return Driven::Resting,
                        (Quiet::Rest, Some(rest)) => {
                            // Not yet (a client not reading what was written, a body left unread):
                            // look again a whole `rest_after` later.
                            let from = Instant::now() + rest;
                            quiet.set(activity.quiet_for(idle, rest_after, Some(from)));
                        }
                        (Quiet::Rest, None) | (Quiet::Close, _) => {
                            tracing::debug!(peer = %self.peer, "closing idle connection");
                            connection.as_mut().begin_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `quiet_for` has resolved with, if it has, after the (paused) clock moves on by `by`.
    async fn quiet_after(
        quiet: &mut Pin<Box<impl Future<Output = Quiet>>>,
        by: Duration,
    ) -> Option<Quiet> {
        tokio::time::advance(by).await;
        std::future::poll_fn(|cx| match quiet.as_mut().poll(cx) {
            std::task::Poll::Ready(due) => std::task::Poll::Ready(Some(due)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_in_flight_for_a_whole_timeout() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(60);
        let mut idle = Box::pin(activity.quiet_for(timeout, None, None));
        assert_eq!(quiet_after(&mut idle, Duration::from_secs(59)).await, None);
        assert_eq!(
            quiet_after(&mut idle, Duration::from_secs(1)).await,
            Some(Quiet::Close)
        );

        // A request in flight is never idleness, however long its response takes.
        let activity = Activity::new();
        let request = activity.begin();
        let mut idle = Box::pin(activity.quiet_for(timeout, None, None));
        assert_eq!(quiet_after(&mut idle, Duration::from_secs(300)).await, None);
        // Its end starts the clock again: idle a whole timeout after that, not before.
        drop(request);
        assert_eq!(quiet_after(&mut idle, Duration::from_secs(59)).await, None);
        assert_eq!(
            quiet_after(&mut idle, Duration::from_secs(61)).await,
            Some(Quiet::Close)
        );
        assert_eq!(activity.requests.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rest_comes_due_before_the_idle_timeout_and_a_refused_one_is_looked_for_later() {
        let activity = Activity::new();
        let (idle, rest) = (Duration::from_secs(60), Duration::from_secs(1));
        let request = activity.begin();
        let mut quiet = Box::pin(activity.quiet_for(idle, Some(rest), None));
        assert_eq!(quiet_after(&mut quiet, Duration::from_secs(5)).await, None);
        drop(request);
        assert_eq!(
            quiet_after(&mut quiet, Duration::from_millis(500)).await,
            None
        );
        assert_eq!(
            quiet_after(&mut quiet, Duration::from_secs(1)).await,
            Some(Quiet::Rest)
        );
        // Looked at again no sooner than asked, not at once; the idle timeout still comes.
        let from = Instant::now() + Duration::from_secs(10);
        let mut quiet = Box::pin(activity.quiet_for(idle, Some(rest), Some(from)));
        assert_eq!(quiet_after(&mut quiet, Duration::from_secs(9)).await, None);
        assert_eq!(
            quiet_after(&mut quiet, Duration::from_secs(1)).await,
            Some(Quiet::Rest)
        );
        let from = Instant::now() + Duration::from_secs(120);
        let mut quiet = Box::pin(activity.quiet_for(idle, Some(rest), Some(from)));
        assert_eq!(
            quiet_after(&mut quiet, Duration::from_secs(60)).await,
            Some(Quiet::Close)
        );
    }

    #[test]
    fn only_a_connection_with_nothing_unfinished_may_rest() {
        let activity = Activity::new();
        assert!(
            !activity.may_rest(),
            "no request yet: the first-head deadline decides"
        );
        let request = activity.begin();
        assert!(!activity.may_rest(), "a request in flight");
        drop(request);
        assert!(activity.may_rest());
        activity.unflushed.store(true, Ordering::Relaxed);
        assert!(!activity.may_rest(), "bytes not yet flushed");
        activity.unflushed.store(false, Ordering::Relaxed);
        activity.body_open.store(true, Ordering::Relaxed);
        assert!(
            !activity.may_rest(),
            "a request body hyper may still be reading"
        );
        activity.body_open.store(false, Ordering::Relaxed);
        activity.bytes_arrived();
        assert!(!activity.may_rest(), "the next head has begun");
    }
}
