//! An HTTP/1.1 connection's life across its keep-alive requests: served by hyper, resting on its TLS
//! session alone once quiet (hyper's buffers freed), woken into a new hyper connection by its next
//! bytes. hyper keeps 8 KiB read and write buffers for a connection's whole life, with no setting to
//! free them while it waits; nginx frees a keep-alive connection's buffers the same way.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1::UpgradeableConnection;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use super::connection::{Activity, Deadlines, Drive, Driven, HeadClock, note_malformed_head};
use crate::metrics::Metrics;

/// How long an HTTP/1.1 connection has had nothing in flight before it rests: hyper's connection is
/// taken apart (its read and write buffers, 16 KiB, freed) and only the TLS session kept until the
/// client's next bytes arrive, as nginx frees a keep-alive connection's request buffers. Not at once:
/// a client sending its next request right away would pay for taking apart and rebuilding each time.
const REST_AFTER: Duration = Duration::from_secs(1);

/// At most this much of what wakes a resting connection is read before hyper gets the connection
/// back (on the stack, only while polled: the rest keeps no buffer).
const WAKE_READ: usize = 4096;

/// How long closing a resting connection (TLS close_notify, then FIN) may take.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// One HTTP/1.1 connection's life: served by hyper until it idles for `REST_AFTER`, then resting on
/// its TLS session alone, then served by a new hyper connection from the bytes it woke on; closed when
/// the client closes, idles past the idle timeout, or the server shuts down.
pub(super) struct Http1 {
    pub(super) builder: hyper::server::conn::http1::Builder,
    pub(super) peer: SocketAddr,
    pub(super) activity: Arc<Activity>,
    pub(super) deadlines: Deadlines,
    pub(super) metrics: Arc<Metrics>,
}

impl Http1 {
    pub(super) async fn serve<I, S, B>(
        self,
        mut connection: Pin<Box<UpgradeableConnection<TokioIo<HeadClock<I>>, S>>>,
        mut shutdown: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = B> + Unpin,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let when = Drive {
            peer: self.peer,
            activity: &self.activity,
            deadlines: self.deadlines,
            turn: None,
            rest_after: Some(REST_AFTER),
        };
        loop {
            match when.drive(&mut connection, &mut shutdown).await {
                Driven::Ended(error) => {
                    if let Some(error) = error {
                        note_malformed_head(&self.metrics, self.peer, &error);
                    }
                    return;
                }
                Driven::Resting => {}
            }
            // `None` only after an upgrade, and an upgraded connection has ended, not rested.
            let Some(mut resting) = take_apart(connection) else {
                return;
            };
            let woken = {
                let _resting = self.metrics.rest_begins();
                let idle = self.deadlines.idle;
                rest(&mut resting.io, &self.activity, idle, &mut shutdown).await
            };
            match woken {
                Woken::BytesArrived => {}
                Woken::ClientClosed => return,
                Woken::Idle | Woken::Shutdown => {
                    let _ = tokio::time::timeout(CLOSE_BOUND, resting.io.shutdown()).await;
                    return;
                }
            }
            connection = wake(&self.builder, *resting);
        }
    }
}

/// What a resting HTTP/1.1 connection keeps: its TLS session (with its reads' `prefix`) and its
/// service. Boxed: by value it would size the task's future for the connection's whole life.
pub(super) struct Resting<I, S> {
    pub(super) io: HeadClock<I>,
    pub(super) service: S,
}

/// The hyper connection taken apart for a rest, its buffers freed; `None` once upgraded. Not async,
/// so nothing of it is kept in the task's future.
fn take_apart<I, S, B>(
    connection: Pin<Box<UpgradeableConnection<TokioIo<HeadClock<I>>, S>>>,
) -> Option<Box<Resting<I, S>>>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parts = Pin::into_inner(connection).into_parts()?;
    let mut io = parts.io.into_inner();
    // An empty `read_buf` still owns hyper's whole read buffer: keeping it would keep 8 KiB.
    io.prefix = match (parts.read_buf, std::mem::take(&mut io.prefix)) {
        (parsed, unread) if parsed.is_empty() => unread,
        (parsed, unread) if unread.is_empty() => Bytes::copy_from_slice(&parsed[..]),
        (parsed, unread) => [parsed, unread].concat().into(),
    };
    Some(Box::new(Resting {
        io,
        service: parts.service,
    }))
}

/// A new hyper connection for a woken one: it reads the bytes that woke it first.
pub(super) fn wake<I, S, B>(
    builder: &hyper::server::conn::http1::Builder,
    resting: Resting<I, S>,
) -> Pin<Box<UpgradeableConnection<TokioIo<HeadClock<I>>, S>>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Resting { io, service } = resting;
    // Upgrades are allowed on both listeners: only the proxy service ever answers 101.
    Box::pin(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
    )
}

enum Woken {
    BytesArrived,
    ClientClosed,
    Idle,
    Shutdown,
}

/// Waits on a resting connection: for its next bytes (then in `io.prefix`, for the next hyper
/// connection to read first), its close, the idle timeout, or shutdown.
async fn rest<I: AsyncRead + Unpin>(
    io: &mut HeadClock<I>,
    activity: &Activity,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Woken {
    let arrived = std::future::poll_fn(|cx| {
        let mut room = [0u8; WAKE_READ];
        let mut buf = ReadBuf::new(&mut room);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            std::task::Poll::Ready(Ok(())) => {
                std::task::Poll::Ready(Some(Bytes::copy_from_slice(buf.filled())))
            }
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    });
    let read = tokio::select! {
        read = arrived => read,
        _ = activity.quiet_for(idle, None, None) => return Woken::Idle,
        _ = shutdown.wait_for(|stop| *stop) => return Woken::Shutdown,
    };
    match read {
        Some(bytes) if !bytes.is_empty() => {
            io.prefix = bytes;
            Woken::BytesArrived
        }
        _ => Woken::ClientClosed,
    }
}
