//! Response compression (`[compression]`): zstd, brotli or gzip by the client's `Accept-Encoding`, through
//! tower-http's `CompressionLayer`, for the configured media types above a minimum size. tower-http
//! never re-encodes a response that has `Content-Encoding` (so precompressed static siblings win) or a
//! range, and adds `Vary: Accept-Encoding`. We also leave alone what says `Cache-Control: no-transform`
//! (RFC 9111 §5.2.2.6). HTML is off by default: compressing a page that carries a secret (the CSRF
//! token) next to reflected input opens BREACH, which Django's GZipMiddleware answers with random
//! length padding (Django ≥ 4.2); with `html = true`, `PadCompressedHtml` adds such padding here.

use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tower::{Layer, Service};
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
        .compress_when(CompressWhen {
            policy: Arc::new(policy.clone()),
        })
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
    pub fn new(policy: Arc<CompressionPolicy>) -> Self {
        CompressWhen { policy }
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

fn is_html(headers: &HeaderMap) -> bool {
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
fn html_padding() -> Bytes {
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

/// Pads HTML that is about to be compressed (`compression.html = true`): inside the compression layer,
/// for responses the predicate will compress and a client that accepts an encoding we use.
#[derive(Clone)]
pub struct PadCompressedHtmlLayer {
    policy: Option<Arc<CompressionPolicy>>,
}

impl PadCompressedHtmlLayer {
    pub fn new(policy: &CompressionPolicy) -> Self {
        PadCompressedHtmlLayer {
            policy: (policy.enabled && policy.html).then(|| Arc::new(policy.clone())),
        }
    }
}

impl<S> Layer<S> for PadCompressedHtmlLayer {
    type Service = PadCompressedHtml<S>;
    fn layer(&self, inner: S) -> PadCompressedHtml<S> {
        PadCompressedHtml {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct PadCompressedHtml<S> {
    inner: S,
    policy: Option<Arc<CompressionPolicy>>,
}

/// Whether `Accept-Encoding` names an encoding the policy uses (q > 0 is left to tower-http; a client
/// that lists one is padded, which costs nothing if it ends up uncompressed).
fn accepts_ours(headers: &HeaderMap, policy: &CompressionPolicy) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|e| {
            e.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .any(|e| match e.as_str() {
            "zstd" => policy.zstd,
            "br" => policy.br,
            "gzip" => policy.gzip,
            "*" => true,
            _ => false,
        })
}

impl<S, B> Service<Request<B>> for PadCompressedHtml<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, S::Error>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let policy = match &self.policy {
            Some(policy) if accepts_ours(req.headers(), policy) => policy.clone(),
            _ => return futures_util::future::Either::Left(self.inner.call(req)),
        };
        let answer = self.inner.call(req);
        futures_util::future::Either::Right(Box::pin(async move {
            let response = answer.await?;
            let predicate = CompressWhen {
                policy: policy.clone(),
            };
            if !is_html(response.headers()) || !predicate.should_compress(&response) {
                return Ok(response);
            }
            let (mut parts, body) = response.into_parts();
            // The compressed length is unknown anyway; tower-http drops Content-Length too.
            parts.headers.remove(CONTENT_LENGTH);
            Ok(Response::from_parts(parts, body.padded(html_padding())))
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::HeaderValue;
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::config::COMPRESSIBLE_TYPES;

    fn policy(html: bool) -> CompressionPolicy {
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

    /// A service answering `content_type` with 4 KiB of repetitive text (and `cache_control`).
    async fn fetch(
        policy: &CompressionPolicy,
        accept: &str,
        content_type: &'static str,
        extra: Option<(&'static str, &'static str)>,
    ) -> (HeaderMap, Bytes) {
        let body = "body { color: #123; margin: 0 } ".repeat(128);
        let service = ServiceBuilder::new()
            .layer(compression_layer(policy))
            .layer(PadCompressedHtmlLayer::new(policy))
            .service(service_fn(move |_req: Request<()>| {
                let body = body.clone();
                async move {
                    let mut response = Response::new(ProxyBody::full(body));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                    if let Some((name, value)) = extra {
                        response
                            .headers_mut()
                            .insert(name, HeaderValue::from_static(value));
                    }
                    Ok::<_, Infallible>(response)
                }
            }));
        let req = Request::builder()
            .header(ACCEPT_ENCODING, accept)
            .body(())
            .expect("request");
        let Ok(response) = service.oneshot(req).await;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (parts.headers, bytes)
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
        // Not padded when uncompressed.
        let (_, body) = fetch(&p, "identity", "text/html", None).await;
        assert_eq!(body.len(), 4096);
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
