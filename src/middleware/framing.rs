//! Checks on the request head that hyper does not make, so both protocols hold the same limits and no
//! framing reaches Gunicorn that two parsers could read two ways.
//!
//! - `limits.max_headers` on HTTP/2: hyper enforces the field count only on HTTP/1.1 (the byte limit,
//!   `max_header_list_size`, holds on both). Cookie fields count as one, as the HTTP/1.1 hop joins them.
//! - `Transfer-Encoding` on HTTP/1.1: exactly one `chunked`, nothing else. hyper accepts `chunked` twice
//!   (RFC 9112 §7.1 forbids applying it twice: a parser that undoes it once reads another body) and any
//!   coding before it, which we would strip and pass on still encoded. Twice is 400; an unknown coding
//!   is 501 (RFC 9112 §6.1).
//! - `Content-Length` with `Transfer-Encoding` stays as RFC 9112 §6.1 allows: read by the chunked
//!   framing, forwarded with a length of its own, and the connection closed after the response. hyper
//!   drops the conflicting length while parsing, before any layer sees the request, so a 400 as nginx
//!   gives would need a change inside hyper; what reaches the upstream is unambiguous either way.

use http::header::{COOKIE, TRANSFER_ENCODING};
use http::{Request, Response, StatusCode, Version};

use super::RequestGate;
use crate::body::ProxyBody;
use crate::response::refused;
use crate::security::SecurityCause;

pub struct RequestHeadCheck {
    max_headers: usize,
}

impl RequestHeadCheck {
    pub fn new(max_headers: usize) -> Self {
        RequestHeadCheck { max_headers }
    }
}

/// Fields as the HTTP/1.1 hop will carry them: every `cookie` field of an HTTP/2 request becomes one.
fn field_count(headers: &http::HeaderMap) -> usize {
    let cookies = headers.get_all(COOKIE).iter().count();
    headers.len() - cookies.saturating_sub(1)
}

/// `Ok` when the request's `Transfer-Encoding` (if any) is a single `chunked`.
fn check_transfer_encoding(headers: &http::HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    let Some(first) = codings.next() else {
        return Ok(());
    };
    let mut chunked = usize::from(first.eq_ignore_ascii_case(b"chunked"));
    let mut other = chunked == 0;
    for coding in codings {
        if coding.eq_ignore_ascii_case(b"chunked") {
            chunked += 1;
        } else {
            other = true;
        }
    }
    if chunked > 1 {
        return Err((
            StatusCode::BAD_REQUEST,
            "Transfer-Encoding chunked more than once",
        ));
    }
    if other {
        return Err((
            StatusCode::NOT_IMPLEMENTED,
            "transfer coding other than chunked",
        ));
    }
    Ok(())
}

impl RequestGate for RequestHeadCheck {
    fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>> {
        if req.version() >= Version::HTTP_2 {
            if field_count(req.headers()) > self.max_headers {
                return Err(Box::new(refused(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "more header fields than limits.max_headers",
                    SecurityCause::TooLarge,
                )));
            }
            return Ok(());
        }
        check_transfer_encoding(req.headers())
            .map_err(|(status, reason)| Box::new(refused(status, reason, SecurityCause::Malformed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, fields: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/").version(version);
        for (name, value) in fields {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request")
    }

    fn status(check: &RequestHeadCheck, mut req: Request<()>) -> StatusCode {
        match check.admit(&mut req) {
            Ok(()) => StatusCode::OK,
            Err(response) => response.status(),
        }
    }

    #[test]
    fn transfer_encoding_must_be_one_chunked() {
        let check = RequestHeadCheck::new(100);
        let te = |values: &[&str]| {
            let fields: Vec<(&str, &str)> =
                values.iter().map(|v| ("transfer-encoding", *v)).collect();
            status(&check, request(Version::HTTP_11, &fields))
        };
        assert_eq!(te(&[]), StatusCode::OK);
        assert_eq!(te(&["chunked"]), StatusCode::OK);
        assert_eq!(te(&["Chunked"]), StatusCode::OK);
        assert_eq!(te(&["chunked", "chunked"]), StatusCode::BAD_REQUEST);
        assert_eq!(te(&["chunked, chunked"]), StatusCode::BAD_REQUEST);
        assert_eq!(te(&["gzip, chunked"]), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(te(&["identity", "chunked"]), StatusCode::NOT_IMPLEMENTED);
    }

    #[test]
    fn http2_field_count_counts_cookies_once() {
        let check = RequestHeadCheck::new(3);
        let cookies = [
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
            ("accept", "*/*"),
        ];
        assert_eq!(
            status(&check, request(Version::HTTP_2, &cookies)),
            StatusCode::OK
        );
        let many = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")];
        assert_eq!(
            status(&check, request(Version::HTTP_2, &many)),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        // HTTP/1.1's count is hyper's, before any layer runs.
        assert_eq!(
            status(&check, request(Version::HTTP_11, &many)),
            StatusCode::OK
        );
    }
}
