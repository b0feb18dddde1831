//! What the request path knows about the connection a request arrived on, set by the server as a request
//! extension and read by the middleware (Host/SNI check, forwarded headers, access log).

use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer: the client, or a trusted load balancer in front of us.
    pub peer: SocketAddr,
    /// The TLS server name the client asked for; `None` on the plain listener or without SNI.
    pub sni: Option<Arc<str>>,
    pub tls: bool,
}
