//! Automatic certificates over ACME (RFC 8555) with instant-acme: account, orders, challenges
//! (TLS-ALPN-01 per RFC 8737, HTTP-01 per RFC 8555 §8.3), storage and renewal.

pub mod http01;

pub use http01::Http01Tokens;
