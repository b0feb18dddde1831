//! portcullis: an HTTPS-terminating reverse proxy that puts the Django deployment checklist at the edge.
//! `main.rs` is a thin CLI over this library so tests drive the real server in-process.

pub mod config;
