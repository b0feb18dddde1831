//! Whole responses compressed in one shot: a response already read whole (a proxied one of modest
//! size, `ProxyBody::Full`) that the client takes as zstd or gzip is compressed here, with an encoder
//! kept per thread and reused. tower-http's streaming encoders are built per response: zstd's context
//! and miniz_oxide's ~300 KiB gzip state were allocated, zeroed and freed for every response, most of
//! its cost. Everything else (streams, files, brotli) still goes to tower-http, which leaves alone what
//! carries `Content-Encoding`. Opted-in HTML (`compression.html`) gets its BREACH padding here first
//! (see `compression`) and is compressed by tower-http.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, VARY};
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_http::compression::predicate::Predicate;

use super::compression::{Choice, CompressWhen, html_padding, is_html, negotiate};
use crate::body::ProxyBody;
use crate::config::CompressionPolicy;

thread_local! {
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DEFLATE: RefCell<Option<(u32, flate2::Compress)>> = const { RefCell::new(None) };
}

/// zstd in one call with this thread's context: the source size is known, so zstd sizes its tables to
/// the response instead of to its default window.
fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    ZSTD.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some((at, compressor)) if *at == level => compressor,
            _ => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        compressor.compress(data)
    })
}

/// gzip (RFC 1952): a fixed header, raw deflate from this thread's reset compressor, CRC-32 and length.
fn gzip_compress(data: &[u8], level: u32) -> std::io::Result<Vec<u8>> {
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    DEFLATE.with_borrow_mut(|slot| {
        let deflate = match slot {
            Some((at, deflate)) if *at == level => {
                deflate.reset();
                deflate
            }
            _ => {
                let fresh = flate2::Compress::new(flate2::Compression::new(level), false);
                &mut slot.insert((level, fresh)).1
            }
        };
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        out.extend_from_slice(&HEADER);
        // Deflate never grows data by more than a few bytes per 16 KiB block; past this bound the
        // compressor is broken, and the response goes out uncompressed instead of looping.
        let bound = data.len() + data.len() / 8 + 1024;
        loop {
            let read = usize::try_from(deflate.total_in()).unwrap_or(usize::MAX);
            let rest = data.get(read..).unwrap_or_default();
            let status = deflate
                .compress_vec(rest, &mut out, flate2::FlushCompress::Finish)
                .map_err(std::io::Error::other)?;
            if status == flate2::Status::StreamEnd {
                break;
            }
            // Short of the end only for want of room: make some, up to the bound (each round adds
            // at least 1 KiB, so a compressor that stops making progress ends here too).
            if out.capacity() > bound {
                return Err(std::io::Error::other("deflate output past its bound"));
            }
            out.reserve(out.capacity() - out.len() + 1024);
        }
        let mut crc = flate2::Crc::new();
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        // ISIZE is the length modulo 2^32 (RFC 1952 §2.3.1).
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        Ok(out)
    })
}

/// The policy's predicate, built once per config; `None` when compression is off.
type Enabled = Option<CompressWhen>;

#[derive(Clone)]
pub struct CompressWholeLayer {
    enabled: Enabled,
}

impl CompressWholeLayer {
    pub fn new(policy: &CompressionPolicy) -> Self {
        CompressWholeLayer {
            enabled: policy.enabled.then(|| CompressWhen::new(policy)),
        }
    }
}

impl<S> Layer<S> for CompressWholeLayer {
    type Service = CompressWhole<S>;
    fn layer(&self, inner: S) -> CompressWhole<S> {
        CompressWhole {
            inner,
            enabled: self.enabled.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CompressWhole<S> {
    inner: S,
    enabled: Enabled,
}

impl<S, B> Service<Request<B>> for CompressWhole<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = CompressWholeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let chosen = self.enabled.as_ref().and_then(|when| {
            let choice = negotiate(req.headers(), when.policy())?;
            Some((when.clone(), choice))
        });
        CompressWholeFuture {
            inner: self.inner.call(req),
            chosen,
        }
    }
}

pin_project! {
    pub struct CompressWholeFuture<F> {
        #[pin]
        inner: F,
        chosen: Option<(CompressWhen, Choice)>,
    }
}

impl<F, E> Future for CompressWholeFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
{
    type Output = Result<Response<ProxyBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(match this.chosen.take() {
            Some((when, choice)) => compress_whole(response, &when, choice),
            None => response,
        }))
    }
}

/// For a client that takes one of our encodings: opted-in HTML padded for tower-http to compress;
/// a whole zstd or gzip response compressed here; else the response as it was. Never what is encoded
/// already or a range (tower-http leaves those alone, and padding would corrupt them).
fn compress_whole(
    response: Response<ProxyBody>,
    when: &CompressWhen,
    choice: Choice,
) -> Response<ProxyBody> {
    let headers = response.headers();
    if headers.contains_key(CONTENT_ENCODING)
        || headers.contains_key(CONTENT_RANGE)
        || !when.should_compress(&response)
    {
        return response;
    }
    if is_html(headers) {
        let (mut parts, body) = response.into_parts();
        // The compressed length is unknown; tower-http drops Content-Length too.
        parts.headers.remove(CONTENT_LENGTH);
        return Response::from_parts(parts, body.padded(html_padding()));
    }
    let whole = match response.body() {
        ProxyBody::Full { data: Some(data) } => data.clone(),
        _ => return response,
    };
    let level = when.policy().level;
    let (compressed, name) = match choice {
        Choice::Zstd => (
            zstd_compress(&whole, i32::try_from(level).unwrap_or(4)),
            "zstd",
        ),
        Choice::Gzip => (gzip_compress(&whole, level.min(9)), "gzip"),
        Choice::Brotli => return response,
    };
    let Ok(compressed) = compressed else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(ACCEPT_RANGES);
    parts
        .headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static(name));
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(compressed.len()));
    let varies = parts.headers.get_all(VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("accept-encoding"))
    });
    if !varies {
        parts
            .headers
            .append(VARY, HeaderValue::from_static("accept-encoding"));
    }
    Response::from_parts(parts, ProxyBody::full(Bytes::from(compressed)))
}

#[cfg(test)]
pub(super) mod tests {
    use std::convert::Infallible;

    use http::HeaderMap;
    use http::header::{ACCEPT_ENCODING, CONTENT_TYPE};
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::middleware::compression::compression_layer;

    fn policy() -> CompressionPolicy {
        crate::middleware::compression::tests::policy(false)
    }

    /// The HTTPS stack's order: tower-http outside, this layer inside it.
    pub(crate) async fn fetch(
        policy: &CompressionPolicy,
        accept: &'static str,
        body: ProxyBody,
        headers: &[(&'static str, &'static str)],
    ) -> (HeaderMap, Bytes) {
        let headers = headers.to_vec();
        let body = std::sync::Mutex::new(Some(body));
        let service = ServiceBuilder::new()
            .layer(compression_layer(policy))
            .layer(CompressWholeLayer::new(policy))
            .service(service_fn(move |_req: Request<()>| {
                let body = body
                    .lock()
                    .ok()
                    .and_then(|mut b| b.take())
                    .unwrap_or_else(ProxyBody::empty);
                let mut response = Response::new(body);
                for (name, value) in &headers {
                    response
                        .headers_mut()
                        .append(*name, HeaderValue::from_static(value));
                }
                async move { Ok::<_, Infallible>(response) }
            }));
        let req = Request::builder()
            .header(ACCEPT_ENCODING, accept)
            .body(())
            .expect("request");
        let Ok(response) = service.oneshot(req).await;
        let (parts, body) = response.into_parts();
        (
            parts.headers,
            body.collect().await.expect("body").to_bytes(),
        )
    }

    fn json() -> Bytes {
        Bytes::from(r#"{"id": 1, "name": "item", "in_stock": true}, "#.repeat(200))
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn incompressible_data_grows_the_output_and_still_round_trips() {
        // xorshift bytes: deflate stores them, so the output outgrows its first guess.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        for level in [1, 9] {
            let gz = gzip_compress(&noise, level).expect("compressed");
            assert!(gz.len() > noise.len(), "stored, not shrunk");
            assert_eq!(gunzip(&gz), noise);
            let zst = zstd_compress(&noise, i32::try_from(level).expect("level")).expect("zstd");
            assert_eq!(
                zstd::bulk::decompress(&zst, noise.len()).expect("valid"),
                noise
            );
        }
    }

    #[tokio::test]
    async fn a_whole_json_response_is_compressed_in_one_shot_and_decodes_to_itself() {
        let p = policy();
        let json_type = [(CONTENT_TYPE.as_str(), "application/json")];
        // Twice each: the second reuses this thread's encoder, which must start clean.
        for _ in 0..2 {
            let (headers, body) =
                fetch(&p, "gzip, zstd", ProxyBody::full(json()), &json_type).await;
            assert_eq!(headers["content-encoding"], "zstd");
            assert_eq!(headers["content-length"], body.len().to_string().as_str());
            assert_eq!(headers.get_all(VARY).iter().count(), 1);
            assert!(body.len() < json().len() / 10, "{} bytes", body.len());
            let decoded = zstd::bulk::decompress(&body, json().len()).expect("valid zstd");
            assert_eq!(decoded, json());

            let (headers, body) = fetch(&p, "gzip", ProxyBody::full(json()), &json_type).await;
            assert_eq!(headers["content-encoding"], "gzip");
            assert_eq!(headers["content-length"], body.len().to_string().as_str());
            assert_eq!(gunzip(&body), json());
        }
        // Brotli stays with tower-http (streamed, no Content-Length), and decodes too.
        let (headers, body) = fetch(&p, "br", ProxyBody::full(json()), &json_type).await;
        assert_eq!(headers["content-encoding"], "br");
        assert!(headers.get(CONTENT_LENGTH).is_none());
        assert!(body.len() < json().len() / 10);
    }

    #[tokio::test]
    async fn encoded_ranged_small_html_and_streamed_responses_are_not_compressed_here() {
        let p = policy();
        let untouched = [
            vec![
                ("content-type", "application/json"),
                ("content-encoding", "br"),
            ],
            vec![
                ("content-type", "application/json"),
                ("content-range", "bytes 0-9/20"),
            ],
            vec![("content-type", "text/html; charset=utf-8")],
            vec![("content-type", "image/png")],
            vec![
                ("content-type", "application/json"),
                ("cache-control", "no-transform"),
            ],
        ];
        for headers in &untouched {
            let (out, body) = fetch(&p, "zstd, gzip", ProxyBody::full(json()), headers).await;
            let kept = headers.iter().any(|(n, _)| *n == "content-encoding");
            assert_eq!(out.get("content-encoding").is_some(), kept, "{headers:?}");
            assert_eq!(body, json(), "{headers:?}");
        }
        let small = Bytes::from_static(b"{\"ok\": true}");
        let (out, body) = fetch(
            &p,
            "zstd",
            ProxyBody::full(small.clone()),
            &[("content-type", "application/json")],
        )
        .await;
        assert!(out.get("content-encoding").is_none());
        assert_eq!(body, small);
        // Off: nothing compresses, whatever the client takes.
        let off = CompressionPolicy {
            enabled: false,
            ..policy()
        };
        let (out, _) = fetch(
            &off,
            "zstd, gzip",
            ProxyBody::full(json()),
            &[("content-type", "application/json")],
        )
        .await;
        assert!(out.get("content-encoding").is_none());
    }
}
