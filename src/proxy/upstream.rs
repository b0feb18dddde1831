//! Connections to the backends: TCP (with `TCP_NODELAY`) or unix sockets, kept alive in a pool of our
//! own. Each connection is driven by the request that uses it (hyper's `client::conn::http1`), not by a
//! task of its own: the backend's bytes wake the request's task directly, where hyper-util's pooled
//! client hands every request and response through a channel to a second task and back. An idle
//! connection is polled by nobody; one the backend closed is noticed when it is taken out, or by the
//! sweep each idle timeout, and dropped.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::pool::unix_authority;
use crate::body::{BoxError, RequestBody, UpstreamBody, UpstreamConnection};
use crate::config::{UpstreamConfig, UpstreamTarget};

/// The largest chunk of an upstream response held at once (see `http1::Builder::max_buf_size` below).
pub const UPSTREAM_READ_BUFFER: usize = 16 * 1024;

/// Why a request got no response head. `Connect`: it never left, so any method may be sent again.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect failed")]
    Connect(#[source] BoxError),
    #[error("upstream request failed")]
    Request(#[source] hyper::Error),
}

impl ClientError {
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_))
    }
}

/// Which kept-alive connection a request may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Any idle one: if it turns out closed, an idempotent request is sent again (see `proxy`).
    Any,
    /// Only one idle for less than this, else a new connection: a request that must never run twice
    /// (a POST) cannot then meet the backend closing an idle connection, as long as this is shorter
    /// than the backend's keep-alive timeout (Gunicorn's `--keep-alive`, 2 s). Zero: always new.
    IdleUnder(Duration),
}

/// The upstream client of one worker thread (or of the health checks): cheap to clone, one pool.
#[derive(Clone)]
pub struct UpstreamClient {
    shared: Arc<ClientShared>,
}

struct ClientShared {
    connector: UpstreamConnector,
    http1: http1::Builder,
    hosts: Mutex<Vec<Host>>,
    /// Idle connections kept per backend at least (0: none kept at all).
    max_idle: usize,
    idle_timeout: Duration,
    sweeping: AtomicBool,
}

/// One backend's idle connections, and how many of its requests are in flight.
struct Host {
    authority: Authority,
    /// Most recently used last: taken from the end, where the connection is least likely closed.
    idle: Vec<Idle>,
    in_flight: usize,
    /// The most requests in flight at once since the last sweep, and in the period before it.
    peak: usize,
    previous_peak: usize,
}

struct Idle {
    conn: Driven,
    since: Instant,
}

impl Host {
    /// Whether a connection coming back is kept: up to `max_idle`, and beyond it while fewer are open
    /// than were in flight at the recent peak, so a burst above the limit does not close and reopen a
    /// connection per request (the churn a fixed limit below the concurrency causes).
    fn keeps_another(&self, max_idle: usize) -> bool {
        keeps_another(
            self.idle.len(),
            self.in_flight,
            self.peak.max(self.previous_peak),
            max_idle,
        )
    }
}

fn keeps_another(idle: usize, in_flight: usize, peak: usize, max_idle: usize) -> bool {
    max_idle > 0 && (idle < max_idle || idle + in_flight < peak)
}

pub fn build_client(config: &UpstreamConfig) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let sockets = config
        .backends
        .iter()
        .enumerate()
        .filter_map(|(index, b)| match &b.target {
            UpstreamTarget::Unix(path) => Some((unix_authority(index), path.clone())),
            UpstreamTarget::Tcp(_) => None,
        })
        .collect();
    let mut http1 = http1::Builder::new();
    // The read buffer is what one unread response body holds at most between the upstream and a client
    // that does not read (hyper's adaptive default grows to 400 KiB). It also bounds the upstream's
    // response head, which Django keeps far below this.
    http1.max_buf_size(UPSTREAM_READ_BUFFER);
    UpstreamClient {
        shared: Arc::new(ClientShared {
            connector: UpstreamConnector {
                http,
                sockets: Arc::new(sockets),
                timeout: config.connect_timeout,
            },
            http1,
            hosts: Mutex::new(Vec::new()),
            max_idle: config.pool_max_idle,
            idle_timeout: config.pool_idle_timeout,
            sweeping: AtomicBool::new(false),
        }),
    }
}

impl UpstreamClient {
    /// Sends `request` (origin-form target) to the backend at `authority`: on a kept-alive connection
    /// when `reuse` allows one that is idle, else on a new one. A kept-alive connection found closed
    /// before the request was written to it (Gunicorn closes idle keep-alives after 2 s) is dropped
    /// and the request sent on another: it never reached the backend, so even a POST is safe to send
    /// again. The response body drives the connection until it ends, then gives it back.
    pub async fn request(
        &self,
        authority: &Authority,
        mut request: Request<RequestBody>,
        reuse: Reuse,
    ) -> Result<Response<UpstreamBody>, ClientError> {
        let mut lease = self.lease(authority);
        loop {
            let reused = lease.take_idle(reuse);
            let was_reused = reused.is_some();
            let mut conn = match reused {
                Some(conn) => conn,
                None => self.connect(authority).await?,
            };
            match conn.send(request).await {
                Ok(response) => {
                    lease.conn = Some(conn);
                    return Ok(
                        response.map(|incoming| UpstreamBody::new(incoming, Box::new(lease)))
                    );
                }
                Err(mut failed) => match failed.take_message() {
                    // Bounded: each pass takes one idle connection out, and a new one ends the loop.
                    Some(unsent) if was_reused => request = unsent,
                    _ => return Err(ClientError::Request(failed.into_error())),
                },
            }
        }
    }

    fn lease(&self, authority: &Authority) -> Lease {
        let mut hosts = self.shared.hosts();
        let index = match hosts.iter().position(|h| h.authority == *authority) {
            Some(index) => index,
            None => {
                hosts.push(Host {
                    authority: authority.clone(),
                    idle: Vec::new(),
                    in_flight: 0,
                    peak: 0,
                    previous_peak: 0,
                });
                hosts.len() - 1
            }
        };
        let host = &mut hosts[index];
        host.in_flight += 1;
        host.peak = host.peak.max(host.in_flight);
        Lease {
            client: self.shared.clone(),
            host: index,
            conn: None,
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<Driven, ClientError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| ClientError::Connect(e.into()))?;
        let io = self
            .shared
            .connector
            .clone()
            .oneshot(uri)
            .await
            .map_err(ClientError::Connect)?;
        let (sender, conn) = self
            .shared
            .http1
            .handshake(io)
            .await
            // Nothing was written yet: as good as not connected.
            .map_err(|e| ClientError::Connect(e.into()))?;
        Ok(Driven {
            sender,
            conn: Some(Box::pin(conn.with_upgrades())),
        })
    }
}

impl ClientShared {
    fn hosts(&self) -> std::sync::MutexGuard<'_, Vec<Host>> {
        // A panic elsewhere while holding the lock leaves the lists consistent (pushes and pops only).
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops idle connections past the idle timeout or closed by the backend, and ages the peaks.
    fn sweep(&self) {
        let mut hosts = self.hosts();
        for host in hosts.iter_mut() {
            host.idle
                .retain_mut(|idle| idle.since.elapsed() < self.idle_timeout && idle.conn.usable());
            host.previous_peak = host.peak;
            host.peak = host.in_flight;
        }
    }

    /// The sweep runs on the runtime of the first request that gave a connection back (its worker),
    /// while the client lives.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let client = Arc::downgrade(self);
        let period = self.idle_timeout.max(Duration::from_secs(1));
        tokio::spawn(sweep_while_alive(client, period));
    }
}

async fn sweep_while_alive(client: Weak<ClientShared>, period: Duration) {
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(client) = client.upgrade() else {
            return;
        };
        client.sweep();
    }
}

/// A connection with the future that drives it. Whoever polls the future moves the bytes: the request
/// and response of its one request at a time, in that request's task.
struct Driven {
    sender: http1::SendRequest<RequestBody>,
    /// `None` once it has finished (closed, failed or upgraded). Dropped then, not kept: hyper's
    /// dispatcher inside it holds the channel a request sent meanwhile waits in, and only dropping it
    /// answers that request (cancelled, with the request given back) instead of leaving it pending.
    conn: Option<Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>>,
}

impl Driven {
    /// Moves the connection along; `Ready` once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(());
        };
        let result = ready!(conn.as_mut().poll(cx));
        self.conn = None;
        if let Err(error) = result {
            tracing::debug!(%error, "upstream connection ended");
        }
        Poll::Ready(())
    }

    /// Whether a new request can go on it now: it has not ended and waits for one. Polled without a
    /// waker: nobody waits on an idle connection, the next poll that matters comes from a request.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx).is_pending() && self.sender.is_ready()
    }

    /// The response head, driving the connection meanwhile. On failure, the request comes back with
    /// the error when it was never written.
    async fn send(
        &mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(request));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = response.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            // What the connection read may already be the head; a connection that ended was dropped,
            // which answers the request with its error.
            let _ = self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// A request's hold on its backend: counted in flight while it lives, and its connection (once it has
/// one) goes back to the pool when it is dropped, if it can take another request.
struct Lease {
    client: Arc<ClientShared>,
    host: usize,
    conn: Option<Driven>,
}

impl Lease {
    /// The most recently used idle connection that can still take a request, if `reuse` allows it.
    /// The list is oldest first, so when the newest is too old for `reuse` so are all the others, and
    /// they stay for requests that may take them.
    fn take_idle(&mut self, reuse: Reuse) -> Option<Driven> {
        let max_idle_for = match reuse {
            Reuse::Any => self.client.idle_timeout,
            Reuse::IdleUnder(limit) => limit.min(self.client.idle_timeout),
        };
        let mut hosts = self.client.hosts();
        let host = hosts.get_mut(self.host)?;
        while host
            .idle
            .last()
            .is_some_and(|idle| idle.since.elapsed() < max_idle_for)
        {
            let mut idle = host.idle.pop()?;
            if idle.conn.usable() {
                return Some(idle.conn);
            }
        }
        None
    }
}

impl UpstreamConnection for Lease {
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.conn.as_mut() {
            Some(conn) => conn.drive(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Checked before the lock: polling may read the backend's close.
        let conn = self.conn.take().filter(|_| self.client.max_idle > 0);
        let conn = conn.and_then(|mut conn| conn.usable().then_some(conn));
        let kept = {
            let mut hosts = self.client.hosts();
            let Some(host) = hosts.get_mut(self.host) else {
                return;
            };
            host.in_flight = host.in_flight.saturating_sub(1);
            match conn {
                Some(conn) if host.keeps_another(self.client.max_idle) => {
                    host.idle.push(Idle {
                        conn,
                        since: Instant::now(),
                    });
                    true
                }
                _ => false,
            }
        };
        if kept {
            self.client.start_sweeping();
        }
    }
}

/// Connects to a backend by the authority of the request URI: a TCP `host:port`, or one of the names
/// `pool::unix_authority` gives unix-socket backends.
#[derive(Clone)]
pub struct UpstreamConnector {
    http: HttpConnector,
    sockets: Arc<Vec<(Authority, PathBuf)>>,
    timeout: Duration,
}

impl Service<Uri> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let socket = uri.authority().and_then(|authority| {
            self.sockets
                .iter()
                .find(|(name, _)| name == authority)
                .map(|(_, path)| path.clone())
        });
        match socket {
            None => {
                let connecting = self.http.call(uri);
                Box::pin(async move { Ok(UpstreamStream::Tcp(connecting.await?)) })
            }
            Some(path) => {
                let timeout = self.timeout;
                Box::pin(async move {
                    let stream = tokio::time::timeout(timeout, UnixStream::connect(&path))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                    Ok(UpstreamStream::Unix(TokioIo::new(stream)))
                })
            }
        }
    }
}

pub enum UpstreamStream {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<UnixStream>),
}

impl Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
            UpstreamStream::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_limit_follows_the_recent_peak() {
        // Up to the configured number, always.
        assert!(keeps_another(0, 0, 0, 2));
        assert!(!keeps_another(2, 0, 0, 2));
        // A burst of 12 in flight: kept while fewer than 12 are open, in the pool or in use.
        assert!(keeps_another(2, 9, 12, 2));
        assert!(keeps_another(11, 0, 12, 2));
        assert!(!keeps_another(12, 0, 12, 2));
        assert!(!keeps_another(3, 9, 12, 2));
        // No idle connections at all when the pool is off.
        assert!(!keeps_another(0, 11, 12, 0));
    }

    async fn driven_over(ours: tokio::io::DuplexStream) -> Driven {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(ours))
            .await
            .expect("handshake");
        Driven {
            sender,
            conn: Some(Box::pin(conn.with_upgrades())),
        }
    }

    async fn read_request(backend: &mut tokio::io::DuplexStream) {
        let mut request = [0u8; 1024];
        let read = tokio::io::AsyncReadExt::read(backend, &mut request).await;
        assert!(read.is_ok_and(|n| n > 0), "a request arrives");
    }

    fn empty_request() -> Request<RequestBody> {
        Request::new(RequestBody::buffered(bytes::Bytes::new()))
    }

    /// A kept-alive connection the backend closes (Gunicorn's keep-alive timeout, a worker restart)
    /// just as a request is given to it: hyper's dispatcher reads the close first and ends cleanly,
    /// leaving the request in its channel, which only dropping the dispatcher answers. Kept, that left
    /// the request waiting until the response timeout. The request must come back unsent, so the
    /// caller sends it on another connection.
    #[tokio::test]
    async fn a_request_given_to_a_kept_alive_connection_that_closed_comes_back_unsent() {
        let (ours, mut backend) = tokio::io::duplex(4096);
        let mut driven = driven_over(ours).await;
        let backend_side = async move {
            read_request(&mut backend).await;
            tokio::io::AsyncWriteExt::write_all(&mut backend, b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("respond");
            backend
        };
        let (first, backend) = tokio::join!(driven.send(empty_request()), backend_side);
        assert!(first.is_ok_and(|r| r.status() == http::StatusCode::NO_CONTENT));
        assert!(driven.usable(), "kept alive after the first response");
        drop(backend);
        let answer = tokio::time::timeout(Duration::from_secs(10), driven.send(empty_request()))
            .await
            .expect("an answer, not a request left pending");
        let mut failed = answer.expect_err("the backend closed");
        assert!(failed.take_message().is_some(), "the request comes back");
        assert!(!driven.usable());
    }

    /// A backend that reads the request, then closes its side without an answer and keeps the socket
    /// (a Gunicorn worker stopping): the request fails at once, as sent (so only an idempotent one is
    /// tried again).
    #[tokio::test]
    async fn a_backend_that_half_closes_after_the_request_fails_it_at_once() {
        let (ours, mut backend) = tokio::io::duplex(4096);
        let mut driven = driven_over(ours).await;
        let backend_side = async move {
            read_request(&mut backend).await;
            tokio::io::AsyncWriteExt::shutdown(&mut backend)
                .await
                .expect("half-close");
            std::future::pending::<()>().await;
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                answer = driven.send(empty_request()) => answer,
                () = backend_side => unreachable!("the backend side never ends"),
            }
        })
        .await
        .expect("an answer, not a request left pending");
        let failed = answer.expect_err("no response came");
        assert!(
            failed.error().is_incomplete_message(),
            "{:?}",
            failed.error()
        );
        assert!(!driven.usable());
    }
}
