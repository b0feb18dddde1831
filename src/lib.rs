//! portcullis: an HTTPS-terminating reverse proxy that puts the Django deployment checklist at the edge.
//! `main.rs` is a thin CLI over this library so tests drive the real server in-process.

pub mod acme;
pub mod body;
pub mod config;
pub mod context;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod middleware;
pub mod proxy;
pub mod response;
pub mod route_path;
pub mod security;
pub mod server;
pub mod static_files;
pub mod store;
pub mod tls;
