//! The maintenance switch (`[errors] maintenance_file`): while the file exists, every request gets 503
//! with `Retry-After` and the file's contents as the page, without reaching Gunicorn; clients in
//! `maintenance_allow` (the team checking the deploy) pass. Creating and removing the file is the whole
//! procedure, as nginx users do it with `if (-f …) { return 503; }`.

use std::path::PathBuf;
use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderValue, Request, Response, StatusCode};
use ipnet::IpNet;

use super::RequestGate;
use crate::body::ProxyBody;
use crate::context::{ConnInfo, TrustedProxies, canonical_ip};
use crate::response::html_page;

pub struct Maintenance {
    file: Option<PathBuf>,
    allow: Vec<IpNet>,
    retry_after: HeaderValue,
    trusted_proxies: TrustedProxies,
}

impl Maintenance {
    pub fn new(
        file: Option<PathBuf>,
        allow: Vec<IpNet>,
        retry_after: Duration,
        trusted_proxies: TrustedProxies,
    ) -> Self {
        Maintenance {
            file,
            allow,
            retry_after: HeaderValue::from(retry_after.as_secs().max(1)),
            trusted_proxies,
        }
    }

    fn allowed<B>(&self, req: &Request<B>) -> bool {
        let Some(conn) = req.extensions().get::<ConnInfo>() else {
            return false;
        };
        let client = canonical_ip(
            self.trusted_proxies
                .client_ip(req.headers(), conn.peer.ip()),
        );
        self.allow.iter().any(|net| net.contains(&client))
    }
}

impl RequestGate for Maintenance {
    fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        // One stat per request while the switch is off; the page is read only while it is on.
        let Ok(page) = std::fs::read(file) else {
            return Ok(());
        };
        if self.allowed(req) {
            return Ok(());
        }
        let page = if page.is_empty() {
            b"<!doctype html>\n<title>503 Service Unavailable</title><h1>Down for maintenance</h1>\n".to_vec()
        } else {
            page
        };
        // Not a failure: no error is counted and the HTTP/1.1 connection stays open.
        let mut response = html_page(StatusCode::SERVICE_UNAVAILABLE, page);
        response
            .headers_mut()
            .insert(RETRY_AFTER, self.retry_after.clone());
        Err(Box::new(response))
    }
}
