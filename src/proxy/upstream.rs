//! Connections to the backends: TCP (with `TCP_NODELAY`) or unix sockets, behind one hyper-util pooled
//! client (pooled per backend) so requests reuse kept-alive connections instead of opening one each.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::Authority;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpStream, UnixStream};
use tower::Service;

use super::pool::unix_authority;
use crate::body::{BoxError, RequestBody};
use crate::config::{UpstreamConfig, UpstreamTarget};

pub type UpstreamClient = Client<UpstreamConnector, RequestBody>;

/// The largest chunk of an upstream response held at once (see `http1_max_buf_size` below).
pub const UPSTREAM_READ_BUFFER: usize = 16 * 1024;

/// `reuse`: keep idle connections for later requests. The client for non-idempotent requests does not:
/// a POST written onto a kept-alive connection just as Gunicorn closes it (its `--keep-alive` timer, a
/// graceful restart) may or may not have run, so it could be neither retried nor trusted. On a new
/// connection, a failure to connect means it never left, and is retried safely.
pub fn build_client(config: &UpstreamConfig, reuse: bool) -> UpstreamClient {
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
    let connector = UpstreamConnector {
        http,
        sockets: Arc::new(sockets),
        timeout: config.connect_timeout,
    };
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(if reuse { config.pool_max_idle } else { 0 })
        // The read buffer is what one unread response body holds at most between the upstream and a
        // client that does not read (hyper's adaptive default grows to 400 KiB). It also bounds the
        // upstream's response head, which Django keeps far below this.
        .http1_max_buf_size(UPSTREAM_READ_BUFFER)
        // Retries only a request whose pooled connection closed before it was written: it never reached
        // the upstream, so even a POST is safe to send again (Gunicorn closes idle keep-alives after 2s).
        .retry_canceled_requests(true)
        .set_host(false)
        .build(connector)
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

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Tcp(s) => s.connected(),
            UpstreamStream::Unix(_) => Connected::new(),
        }
    }
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
