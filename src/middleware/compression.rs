//! Response compression (`[compression]`): zstd, brotli or gzip by the client's `Accept-Encoding`, through
//! tower-http's `CompressionLayer`, for the configured media types above a minimum size. tower-http
//! never re-encodes a response that has `Content-Encoding` (so precompressed static siblings win) or a
//! range, and adds `Vary: Accept-Encoding`. We also leave alone what says `Cache-Control: no-transform`
//! (RFC 9111 §5.2.2.6). HTML is off by default: compressing a page that carries a secret (the CSRF
//! token) next to reflected input opens BREACH, which Django's GZipMiddleware answers with random
//! length padding (Django ≥ 4.2); with `html = true`, `compress_whole` adds such padding
//! (`html_padding`) before tower-http compresses the page.

use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response};
use http_body::Body;
use tower_http::compression::predicate::{Predicate, SizeAbove};
use tower_http::compression::{CompressionBody, CompressionLayer, CompressionLevel};
use tower_http::map_response_body::MapResponseBodyLayer;

use crate::body::ProxyBody;
use crate::config::CompressionPolicy;

/// tower-http's layer with our choice of encodings, level and predicate.
pub fn compression_layer(policy: &CompressionPolicy) -> CompressionLayer<CompressWhen> {
    let on = policy.enabled;
    CompressionLayer::new()
        .zstd(on && policy.zstd)
        .br(on && policy.br)
        .gzip(on && policy.gzip)
        .no_deflate()
        .quality(CompressionLevel::Precise(
            i32::try_from(policy.level).unwrap_or(4),
        ))
        .compress_when(CompressWhen::new(policy))
}

/// tower-http's compressed body holds every encoder's state inline (brotli's is kilobytes): 6.2 KiB,
/// copied whole each time a layer or hyper moves the response, about ten times per request whether or
/// not it compresses. One box right under the outermost layer makes those moves pointer-sized.
pub type BoxedCompressionBody = Pin<Box<CompressionBody<ProxyBody>>>;

pub fn box_compression_body_layer()
-> MapResponseBodyLayer<fn(CompressionBody<ProxyBody>) -> BoxedCompressionBody> {
    MapResponseBodyLayer::new(Box::pin)
}

/// Whether a response is worth compressing and safe to.
#[derive(Clone)]
pub struct CompressWhen {
    policy: Arc<CompressionPolicy>,
}

impl CompressWhen {
    pub fn new(policy: &CompressionPolicy) -> Self {
        CompressWhen {
            policy: Arc::new(policy.clone()),
        }
    }

    pub fn policy(&self) -> &CompressionPolicy {
        &self.policy
    }
}

impl Predicate for CompressWhen {
    fn should_compress<B: Body>(&self, response: &Response<B>) -> bool {
        let policy = &self.policy;
        policy.enabled
            && !no_transform(response.headers())
            && is_compressible(response.headers(), policy)
            && SizeAbove::new(policy.min_size).should_compress(response)
    }
}

/// The media type without parameters, as sent (compared case-insensitively: asked on every response,
/// so nothing is allocated).
fn media_type(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next()?.trim())
}

pub(super) fn is_html(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(|t| t.eq_ignore_ascii_case("text/html"))
}

fn is_compressible(headers: &HeaderMap, policy: &CompressionPolicy) -> bool {
    match media_type(headers) {
        Some(t) if t.eq_ignore_ascii_case("text/html") => policy.html,
        Some(t) => policy
            .types
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(t)),
        None => false,
    }
}

fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-transform"))
}

/// Random padding for a compressed HTML page, as Django's GZipMiddleware does in the gzip header: up to
/// 100 incompressible bytes inside an HTML comment after the page, so its compressed length no longer
/// tells an attacker which guess matched the secret.
pub(super) fn html_padding() -> Bytes {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // SipHash under the process's random keys: not guessable from outside, which is all padding needs.
    let state = std::collections::hash_map::RandomState::new();
    let mut next = {
        let mut counter = 0u64;
        move || {
            counter += 1;
            let mut hasher = state.build_hasher();
            hasher.write_u64(counter);
            hasher.finish()
        }
    };
    let len = usize::try_from(next() % 101).unwrap_or(0);
    let mut out = Vec::with_capacity(len + 16);
    out.extend_from_slice(b"\n<!-- ");
    for _ in 0..len {
        out.push(ALPHABET[usize::try_from(next() % 64).unwrap_or(0)]);
    }
    out.extend_from_slice(b" -->");
    Bytes::from(out)
}

/// What a client's `Accept-Encoding` picks among what we use (RFC 9110 §12.5.3): the highest q-value,
/// ties to zstd, then brotli, then gzip, as tower-http orders them; `*` stands for any not named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Zstd,
    Brotli,
    Gzip,
}

pub fn negotiate(headers: &HeaderMap, policy: &CompressionPolicy) -> Option<Choice> {
    // q-values in thousandths; None: not named.
    let (mut zstd, mut br, mut gzip, mut any) = (None, None, None, None);
    let fields = headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok());
    for coding in fields.flat_map(|v| v.split(',')) {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or("").trim();
        let Some(q) = parts.next().map_or(Some(1000), |q| parse_q(q.trim())) else {
            continue;
        };
        let slot = match name {
            n if n.eq_ignore_ascii_case("zstd") => &mut zstd,
            n if n.eq_ignore_ascii_case("br") => &mut br,
            n if n.eq_ignore_ascii_case("gzip") => &mut gzip,
            "*" => &mut any,
            _ => continue,
        };
        *slot = Some(q);
    }
    let q = |named: Option<u16>, on: bool| if on { named.or(any).unwrap_or(0) } else { 0 };
    [
        (q(zstd, policy.zstd), 3, Choice::Zstd),
        (q(br, policy.br), 2, Choice::Brotli),
        (q(gzip, policy.gzip), 1, Choice::Gzip),
    ]
    .into_iter()
    .filter(|&(q, _, _)| q > 0)
    .max_by_key(|&(q, rank, _)| (q, rank))
    .map(|(_, _, choice)| choice)
}

/// `q=0.5` as 500; `None` when malformed (the coding is then ignored, as tower-http does).
fn parse_q(text: &str) -> Option<u16> {
    let value = text
        .strip_prefix("q=")
        .or_else(|| text.strip_prefix("Q="))?;
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u16 = match whole {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    let thousandths = fraction
        .bytes()
        .zip([100, 10, 1])
        .map(|(digit, place)| u16::from(digit - b'0') * place)
        .sum::<u16>();
    let q = whole + thousandths;
    (q <= 1000).then_some(q)
}

#[cfg(test)]
pub(super) mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::config::COMPRESSIBLE_TYPES;

    pub(crate) fn policy(html: bool) -> CompressionPolicy {
        CompressionPolicy {
            enabled: true,
            zstd: true,
            br: true,
            gzip: true,
            min_size: 1024,
            types: COMPRESSIBLE_TYPES.iter().map(|t| t.to_string()).collect(),
            html,
            level: 4,
        }
    }

    /// 4 KiB of repetitive text as `content_type` (and one more header), through the HTTPS stack's
    /// compression layers.
    async fn fetch(
        policy: &CompressionPolicy,
        accept: &'static str,
        content_type: &'static str,
        extra: Option<(&'static str, &'static str)>,
    ) -> (HeaderMap, Bytes) {
        let body = ProxyBody::full("body { color: #123; margin: 0 } ".repeat(128));
        let mut headers = vec![("content-type", content_type)];
        headers.extend(extra);
        crate::middleware::compress_whole::tests::fetch(policy, accept, body, &headers).await
    }

    fn accept(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn the_highest_q_value_wins_and_ties_go_to_zstd_then_brotli_then_gzip() {
        let p = policy(false);
        for (value, expected) in [
            ("gzip, deflate, br, zstd", Some(Choice::Zstd)),
            ("gzip, br", Some(Choice::Brotli)),
            ("GZIP", Some(Choice::Gzip)),
            ("zstd;q=0, gzip", Some(Choice::Gzip)),
            ("br;q=1.0, zstd;q=0.5", Some(Choice::Brotli)),
            ("gzip;q=0.001, zstd;q=0", Some(Choice::Gzip)),
            ("*", Some(Choice::Zstd)),
            ("*;q=0.5, gzip", Some(Choice::Gzip)),
            ("identity", None),
            ("gzip;q=0", None),
            ("gzip;q=2, zstd;q=0.1234", None),
            ("", None),
        ] {
            assert_eq!(negotiate(&accept(value), &p), expected, "{value:?}");
        }
        let no_zstd = CompressionPolicy {
            zstd: false,
            ..policy(false)
        };
        assert_eq!(
            negotiate(&accept("zstd, gzip"), &no_zstd),
            Some(Choice::Gzip)
        );
    }

    #[tokio::test]
    async fn css_is_compressed_by_the_best_encoding_the_client_takes() {
        let p = policy(false);
        for (accept, expected) in [
            ("gzip, deflate, br, zstd", "zstd"),
            ("gzip, br", "br"),
            ("gzip", "gzip"),
        ] {
            let (headers, body) = fetch(&p, accept, "text/css; charset=utf-8", None).await;
            assert_eq!(headers["content-encoding"], expected, "{accept}");
            assert_eq!(headers["vary"], "accept-encoding");
            assert!(body.len() < 4096 / 4, "{expected}: {} bytes", body.len());
        }
        let (headers, body) = fetch(&p, "identity", "text/css", None).await;
        assert!(headers.get("content-encoding").is_none());
        assert_eq!(body.len(), 4096);
    }

    #[tokio::test]
    async fn html_images_small_and_no_transform_responses_stay_as_they_are() {
        let p = policy(false);
        for (content_type, extra) in [
            ("text/html; charset=utf-8", None),
            ("image/png", None),
            (
                "application/json",
                Some(("cache-control", "private, no-transform")),
            ),
            ("application/json", Some(("content-encoding", "br"))),
        ] {
            let (headers, body) = fetch(&p, "gzip, br", content_type, extra).await;
            let encoding = headers
                .get("content-encoding")
                .map(|v| v.to_str().unwrap_or(""));
            assert!(
                encoding.is_none() || extra == Some(("content-encoding", "br")),
                "{content_type} {extra:?}"
            );
            assert_eq!(body.len(), 4096, "{content_type} {extra:?}: untouched");
        }
        // Below the minimum size.
        let small = CompressionPolicy {
            min_size: 8192,
            ..policy(false)
        };
        let (headers, _) = fetch(&small, "gzip", "text/css", None).await;
        assert!(headers.get("content-encoding").is_none());
        let off = CompressionPolicy {
            enabled: false,
            ..policy(false)
        };
        let (headers, _) = fetch(&off, "gzip, br, zstd", "text/css", None).await;
        assert!(headers.get("content-encoding").is_none());
    }

    #[tokio::test]
    async fn opted_in_html_is_compressed_with_random_padding() {
        let p = policy(true);
        let mut lengths = std::collections::HashSet::new();
        for _ in 0..20 {
            let (headers, body) = fetch(&p, "gzip", "text/html; charset=utf-8", None).await;
            assert_eq!(headers["content-encoding"], "gzip");
            lengths.insert(body.len());
        }
        assert!(
            lengths.len() > 5,
            "the compressed length varies: {lengths:?}"
        );
        // Decompressed, the page is intact and the padding is a comment after it.
        let mut decoder = gunzip(&fetch(&p, "gzip", "text/html", None).await.1);
        assert!(decoder.starts_with("body { color: #123; margin: 0 } "));
        let tail = decoder.split_off(4096);
        assert!(
            tail.starts_with("\n<!-- ") && tail.ends_with(" -->"),
            "{tail}"
        );
        // Not padded when uncompressed, nor when the app compressed it already (padding would land
        // after its gzip stream and corrupt it).
        let (_, body) = fetch(&p, "identity", "text/html", None).await;
        assert_eq!(body.len(), 4096);
        let (headers, body) =
            fetch(&p, "gzip", "text/html", Some(("content-encoding", "gzip"))).await;
        assert_eq!(headers["content-encoding"], "gzip");
        assert_eq!(body.len(), 4096, "passed on untouched");
    }

    fn gunzip(compressed: &[u8]) -> String {
        use std::io::Read;
        let mut out = String::new();
        flate2::read::GzDecoder::new(compressed)
            .read_to_string(&mut out)
            .expect("gunzip");
        out
    }
}
