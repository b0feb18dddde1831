//! What the request path knows about the connection a request arrived on, set by the server as a request
//! extension and read by the middleware (Host/SNI check, forwarded headers, access log).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, watch};

#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer: the client, or a trusted load balancer in front of us.
    pub peer: SocketAddr,
    /// The TLS server name the client asked for; `None` on the plain listener or without SNI.
    pub sni: Option<Arc<str>>,
    pub tls: bool,
    /// The connection's place under `limits.max_connections`. A WebSocket tunnel keeps a clone, so an
    /// upgraded connection still counts (and is waited for on shutdown) after hyper lets go of it.
    pub slot: Arc<OwnedSemaphorePermit>,
    /// Turns true when the server shuts down; long-lived tunnels close on it instead of holding up the
    /// drain for the whole grace period.
    pub shutdown: watch::Receiver<bool>,
}
