//! One client connection from accept to close: the TLS handshake (bounded in time), then hyper serving
//! the tower stack over the protocol ALPN chose, until the client is done, sends no complete request
//! head within `limits.header_read_timeout` of connecting, idles past `limits.idle_timeout` with no
//! request in flight, or the server shuts down (then in-flight requests finish first).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::time::Duration;

use bytes::Bytes;
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
struct Activity {
    started: Instant,
    /// Requests whose head hyper has parsed, ever.
    requests: AtomicU64,
    in_flight: AtomicUsize,
    last_millis: AtomicU64,
    /// Milliseconds since `started` (+1, so 0 means none) at which bytes arrived with no request in
    /// flight: the start of the next HTTP/1.1 head. Cleared when hyper hands that request over.
    head_started: AtomicU64,
    head_begins: tokio::sync::Notify,
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
        })
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

    /// Resolves once the connection has had no request in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                // A long response is not idleness: look again a whole timeout later.
                tokio::time::sleep(timeout).await;
                continue;
            }
            let last =
                self.started + Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
            let idle_since = last.elapsed();
            if idle_since >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle_since).await;
        }
    }
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
        if let Some(serving) = accepting.await {
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
struct HeadClock<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadClock<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
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
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
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
/// (benches/idle.py).
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
    };
    let metrics = shared.fixed.metrics.clone();
    let service = tracked_service(info, shared, activity.clone(), stack_of);
    let limits = Deadlines {
        first_head: runtime.config.limits.header_read_timeout,
        idle: runtime.config.limits.idle_timeout,
        next_heads: matches!(protocol, Protocol::Http1),
    };
    // HTTP/2 only: an HTTP/1.1 response is one write already, and holding it would cost a poll.
    let turn = matches!(protocol, Protocol::Http2).then(PollTurn::default);
    let connection = match &turn {
        // Upgrades are allowed on both listeners: only the proxy service ever answers 101.
        None => Either::Left(Box::pin(
            runtime
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        )),
        Some(turn) => Either::Right(Box::pin(runtime.http2.serve_connection(
            TokioIo::new(CoalescedWrites::new(io, turn.clone())),
            service,
        ))),
    };
    async move {
        match connection {
            Either::Left(http1) => {
                if let Some(error) = drive(http1, peer, &activity, limits, shutdown, None).await {
                    note_malformed_head(&metrics, peer, &error);
                }
            }
            Either::Right(http2) => {
                drive(http2, peer, &activity, limits, shutdown, turn.as_ref()).await;
            }
        }
    }
}

/// An HTTP/1.1 head hyper could not parse (or that overran `limits.max_header_bytes`) never became a
/// request, so no layer saw it: it goes to the security log from here. hyper has answered it with 400
/// or 431 already.
fn note_malformed_head(metrics: &Metrics, peer: SocketAddr, error: &hyper::Error) {
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
struct Deadlines {
    /// A connection that has not sent one complete request head by then is closed, whatever protocol
    /// it speaks (hyper's HTTP/1.1 header timer covers later requests; HTTP/2 has none of its own).
    first_head: Duration,
    idle: Duration,
    /// HTTP/1.1: each later head must also arrive within `first_head` of its first byte. (HTTP/2 sends
    /// frames while idle, and its heads come in HEADERS frames hyper bounds by size.)
    next_heads: bool,
}

/// Runs a connection to completion; on idleness or server shutdown asks it to close after what is in
/// flight (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`). A connection that never sent a request head
/// is dropped outright: there is nothing in flight to finish. Returns the connection's error, if any.
/// Each poll of the connection advances `turn`, when given, for its `CoalescedWrites`.
async fn drive<C: GracefulConnection>(
    mut connection: Pin<Box<C>>,
    peer: SocketAddr,
    activity: &Activity,
    deadlines: Deadlines,
    mut shutdown: watch::Receiver<bool>,
    turn: Option<&PollTurn>,
) -> Option<hyper::Error> {
    let idle = activity.idle_for(deadlines.idle);
    let mut idle = std::pin::pin!(idle);
    let first_head = tokio::time::sleep(deadlines.first_head);
    let mut first_head = std::pin::pin!(first_head);
    let mut waiting_for_first_head = true;
    let mut closing = false;
    loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| {
                if let Some(turn) = turn {
                    turn.advance();
                }
                connection.as_mut().poll(cx)
            }) => {
                let error = result.err();
                if let Some(e) = &error {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return error;
            }
            _ = &mut first_head, if waiting_for_first_head => {
                if activity.requests.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(%peer, "no request head within the header timeout; closing");
                    return None;
                }
                waiting_for_first_head = false;
            }
            _ = shutdown.wait_for(|stop| *stop), if !closing => {
                connection.as_mut().begin_shutdown();
                closing = true;
            }
            _ = activity.head_overdue(deadlines.first_head), if deadlines.next_heads => {
                tracing::debug!(%peer, "a request head took longer than the header timeout; closing");
                return None;
            }
            _ = &mut idle, if !closing => {
                tracing::debug!(%peer, "closing idle connection");
                connection.as_mut().begin_shutdown();
                closing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `idle_for` has resolved after the (paused) clock moves on by `by`.
    async fn idle_after(idle: &mut Pin<Box<impl Future<Output = ()>>>, by: Duration) -> bool {
        tokio::time::advance(by).await;
        std::future::poll_fn(|cx| std::task::Poll::Ready(idle.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_in_flight_for_a_whole_timeout() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(60);
        let mut idle = Box::pin(activity.idle_for(timeout));
        assert!(!idle_after(&mut idle, Duration::from_secs(59)).await);
        assert!(idle_after(&mut idle, Duration::from_secs(1)).await);

        // A request in flight is never idleness, however long its response takes.
        let activity = Activity::new();
        let request = activity.begin();
        let mut idle = Box::pin(activity.idle_for(timeout));
        assert!(!idle_after(&mut idle, Duration::from_secs(300)).await);
        // Its end starts the clock again: idle a whole timeout after that, not before.
        drop(request);
        assert!(!idle_after(&mut idle, Duration::from_secs(59)).await);
        assert!(idle_after(&mut idle, Duration::from_secs(61)).await);
        assert_eq!(activity.requests.load(Ordering::Relaxed), 1);
    }
}
