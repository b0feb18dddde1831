//! Files served from disk under URL prefixes (`[[static]]`): Django's `STATIC_ROOT` after `collectstatic`,
//! served the way Django's deployment guide has nginx do it (`location /static/ { alias …; }`), so no
//! Gunicorn worker spends time on a stylesheet. tower-http's `ServeDir` does the HTTP work: path checks,
//! `Content-Type`, conditional GET, `Range`, and precompressed `.br`/`.gz` siblings (WhiteNoise's
//! compressed storage writes them). Its file access goes through `DirectFs` (below), not `tokio::fs`.
//! Symbolic links are followed like nginx does (`collectstatic --link` makes them on purpose) unless the
//! mount says `symlinks = "inside"`: then a file whose real path is outside the folder is a 404.
//! An `internal` mount serves only the files an upstream response names in `X-Accel-Redirect` (Django's
//! private media behind a login check, without a worker streaming the file); requested directly, a 404.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::io::{self, Cursor, Read};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, EXPIRES, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tower::{Service, ServiceExt};
use tower_http::services::ServeDir;
use tower_http::services::fs::{Backend, DefaultServeDirFallback, File};

use crate::body::{BufferBudget, ProxyBody, held_bytes};
use crate::config::{StaticMount, SymlinkPolicy};
use crate::context::{AccelRedirect, UpstreamBackend, UpstreamTiming};
use crate::proxy::ProxyService;
use crate::response::{Blame, error_page, status_page};
use crate::route_path::route_path;

struct Mount {
    /// Starts and ends with `/`.
    url: String,
    files: ServeDir<DefaultServeDirFallback, DirectFs>,
    cache_control: Option<HeaderValue>,
    internal: bool,
}

/// The configured mounts, longest prefix first.
pub struct StaticFiles {
    mounts: Vec<Mount>,
    /// Whether any mount is `internal`: only then are upstream responses inspected for a redirect.
    has_internal: bool,
}

impl StaticFiles {
    pub fn new(mounts: &[StaticMount], budget: &BufferBudget) -> StaticFiles {
        StaticFiles {
            has_internal: mounts.iter().any(|m| m.internal),
            mounts: mounts
                .iter()
                .map(|m| {
                    let inside = (m.symlinks == SymlinkPolicy::Inside).then(|| {
                        Arc::new(std::fs::canonicalize(&m.dir).unwrap_or_else(|_| m.dir.clone()))
                    });
                    let backend = DirectFs {
                        budget: budget.clone(),
                        inside,
                    };
                    Mount {
                        url: m.url.clone(),
                        // No directory listings, no index pages, no redirects: a static folder
                        // serves files. Small chunks: an unread HTTP/2 stream holds one at most.
                        files: ServeDir::with_backend(&m.dir, backend)
                            .append_index_html_on_directories(false)
                            .redirect_to_trailing_slash(false)
                            .precompressed_br()
                            .precompressed_gzip()
                            .with_buf_chunk_size(CHUNK),
                        cache_control: m.cache_control.clone(),
                        internal: m.internal,
                    }
                })
                .collect(),
        }
    }

    /// The mount a path is under, internal or not.
    fn mount_for(&self, path: &str) -> Option<&Mount> {
        self.mounts.iter().find(|m| path.starts_with(&m.url))
    }

    /// Answers a request whose path is under a mount; an internal one is not there for clients.
    async fn serve(&self, req: Request<Incoming>, path: String) -> Response<ProxyBody> {
        match self.mount_for(&path) {
            Some(mount) if !mount.internal => {
                let (parts, _body) = req.into_parts();
                mount.serve(parts, &path).await
            }
            _ => status_page(StatusCode::NOT_FOUND),
        }
    }

    /// Serves the file an upstream response named in `X-Accel-Redirect`, as nginx does: the method
    /// becomes GET (HEAD stays HEAD), the client's conditional and range headers apply, the upstream body
    /// is dropped, and the upstream's `Content-Type`, `Content-Disposition`, `Cache-Control`, `Expires`
    /// and `Set-Cookie` are kept. A path under no internal mount is the upstream's mistake: 502.
    async fn serve_redirect(
        &self,
        mut parts: http::request::Parts,
        target: &HeaderValue,
        upstream: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        // The value is a URI path (percent-encoded, perhaps with a query); routed like a request's.
        let raw = target.to_str().unwrap_or("");
        let raw_path = raw.split_once('?').map_or(raw, |(path, _)| path);
        let path = route_path(raw_path);
        let mount = match self.mount_for(&path) {
            Some(mount) if mount.internal && raw_path.starts_with('/') => mount,
            _ => {
                tracing::warn!(
                    target = raw,
                    "upstream sent X-Accel-Redirect to a path under no `[[static]]` mount with `internal = true`"
                );
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    Blame::Upstream,
                    "X-Accel-Redirect outside the internal mounts",
                );
            }
        };
        if parts.method != Method::HEAD {
            parts.method = Method::GET;
        }
        let (upstream, _placeholder) = upstream.into_parts();
        let mut response = mount.serve(parts, &path).await;
        let served =
            response.status().is_success() || response.status() == StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        // What describes the file is the app's to say; a 404 page keeps its own type.
        for name in [CONTENT_TYPE, CONTENT_DISPOSITION, CACHE_CONTROL, EXPIRES] {
            match upstream.headers.get(&name) {
                Some(value) if served => {
                    headers.insert(name, value.clone());
                }
                _ => {}
            }
        }
        for cookie in upstream.headers.get_all(SET_COOKIE) {
            headers.append(SET_COOKIE, cookie.clone());
        }
        // The access log names the backend and its time, as for any proxied request.
        if let Some(timing) = upstream.extensions.get::<UpstreamTiming>() {
            response.extensions_mut().insert(*timing);
        }
        if let Some(backend) = upstream.extensions.get::<UpstreamBackend>() {
            response.extensions_mut().insert(backend.clone());
        }
        response
    }
}

impl Mount {
    /// Serves `path` (a `route_path`, under this mount) with the request's method and headers.
    async fn serve(&self, mut parts: http::request::Parts, path: &str) -> Response<ProxyBody> {
        // The path inside the folder keeps its leading '/'; the query is irrelevant to a file.
        let inside = &path[self.url.len() - 1..];
        // Missing, hidden and malformed all look the same from outside: an ordinary 404.
        if is_hidden(inside) {
            return status_page(StatusCode::NOT_FOUND);
        }
        // `inside` is decoded; ServeDir decodes its URI path again, so it gets it encoded once more.
        let encoded: std::borrow::Cow<str> =
            percent_encoding::utf8_percent_encode(inside, PATH_INSIDE).into();
        let Ok(uri) = Uri::try_from(&*encoded) else {
            return status_page(StatusCode::NOT_FOUND);
        };
        parts.uri = uri;
        let request = Request::from_parts(parts, Empty::<Bytes>::new());
        let Ok(response) = self.files.clone().oneshot(request).await;
        match response.status() {
            StatusCode::NOT_FOUND => status_page(StatusCode::NOT_FOUND),
            StatusCode::METHOD_NOT_ALLOWED => {
                let mut refused = error_page(
                    StatusCode::METHOD_NOT_ALLOWED,
                    Blame::Client,
                    "static files are GET/HEAD only",
                );
                refused
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                refused
            }
            status if status.is_server_error() => error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Blame::Proxy,
                "static file unreadable",
            ),
            _ => {
                let mut response = response.map(ProxyBody::file);
                if let Some(value) = &self.cache_control {
                    response.headers_mut().insert(CACHE_CONTROL, value.clone());
                }
                response
            }
        }
    }
}

/// Everything but the unreserved characters and `/` is escaped on the way to `ServeDir`.
const PATH_INSIDE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A segment of a `route_path`-normalised path starting with `.` (`.git`, `.env`): never served, even
/// if collectstatic copied one into the folder.
fn is_hidden(path: &str) -> bool {
    path.split(['/', '\\'])
        .any(|segment| segment.starts_with('.'))
}

/// The innermost service: static files where a mount matches, the upstream otherwise.
#[derive(Clone)]
pub struct StaticOrProxy {
    files: Arc<StaticFiles>,
    proxy: ProxyService,
}

impl StaticOrProxy {
    pub fn new(files: StaticFiles, proxy: ProxyService) -> Self {
        StaticOrProxy {
            files: Arc::new(files),
            proxy,
        }
    }
}

impl Service<Request<Incoming>> for StaticOrProxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let path = route_path(req.uri().path());
        if self.files.mount_for(&path).is_some() {
            let path = path.into_owned();
            let files = self.files.clone();
            return Box::pin(async move { Ok(files.serve(req, path).await) });
        }
        if !self.files.has_internal {
            return self.proxy.call(req);
        }
        // Kept for a redirect to a file: the method and the headers that shape its answer.
        let mut kept = Request::new(());
        *kept.method_mut() = req.method().clone();
        *kept.headers_mut() = req.headers().clone();
        let (kept, ()) = kept.into_parts();
        let files = self.files.clone();
        let proxied = self.proxy.call(req);
        Box::pin(async move {
            let Ok(response) = proxied.await;
            let target = response.extensions().get::<AccelRedirect>().cloned();
            Ok(match target {
                Some(AccelRedirect(target)) => files.serve_redirect(kept, &target, response).await,
                None => response,
            })
        })
    }
}

/// Files up to this size are read whole when opened (while the buffer budget has room for them);
/// larger ones are read in chunks from the blocking pool.
const READ_WHOLE_UP_TO: u64 = 1024 * 1024;

/// What `ServeDir` reads at a time from a file, and so what an unread HTTP/2 stream holds beyond its
/// send buffer.
const CHUNK: usize = 16 * 1024;

/// File access for `ServeDir` without a thread hop per system call. `tokio::fs` runs every `stat`,
/// `open` and `read` on the blocking pool. That made a 4 KiB stylesheet cost 65 µs of CPU, against
/// nginx's 14 µs (`benches/load.py`, static-h1). Static files are small and almost always in the page
/// cache, so here they are read directly on the runtime thread, as nginx does without `aio`. Only
/// files over `READ_WHOLE_UP_TO`, or past the memory budget, are read from the blocking pool. Keep static
/// folders on local disk: on a network filesystem, a slow `read` would stall the connections on this
/// thread.
#[derive(Clone)]
pub struct DirectFs {
    budget: BufferBudget,
    /// The folder's real path, when links must not lead out of it.
    inside: Option<Arc<PathBuf>>,
}

pub enum DirectFile {
    Whole {
        data: Cursor<Bytes>,
        metadata: std::fs::Metadata,
    },
    Streamed {
        file: tokio::fs::File,
        metadata: std::fs::Metadata,
    },
}

impl DirectFs {
    /// Opens a regular file, refusing one that resolves outside the folder when so configured. The
    /// check reads the opened descriptor's path, so a link swapped between check and open changes
    /// nothing.
    fn open_file(&self, path: &std::path::Path) -> io::Result<(std::fs::File, std::fs::Metadata)> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO left in the folder must not block this thread waiting for a
        // writer; anything but a regular file is then refused as absent.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(io::ErrorKind::NotFound.into());
        }
        if let Some(root) = &self.inside {
            let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
            if !real.starts_with(root.as_path()) {
                tracing::debug!(path = %path.display(), real = %real.display(), "static file links outside its folder; refused");
                return Err(io::ErrorKind::NotFound.into());
            }
        }
        Ok((file, metadata))
    }
}

/// The file's `len` bytes, as its metadata (and so `Content-Length`) said: a file that grew since is
/// cut at that length, one that shrank is an error rather than a short body. std's `read_to_end` would
/// stat and seek again to size its buffer and read once more to see the end: three system calls a
/// file that the length already answers.
fn read_exactly(file: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    let capacity =
        usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
    let mut data = Vec::with_capacity(capacity);
    // `take` stops at the length without asking the file again; a full buffer needs no probe read.
    file.take(len).read_to_end(&mut data)?;
    if data.len() != capacity {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(data)
}

impl Backend for DirectFs {
    type File = DirectFile;
    type Metadata = std::fs::Metadata;
    type OpenFuture = Ready<io::Result<DirectFile>>;
    type MetadataFuture = Ready<io::Result<std::fs::Metadata>>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        let (mut file, metadata) = match self.open_file(&path) {
            Ok(opened) => opened,
            Err(e) => return ready(Err(e)),
        };
        let hold = (metadata.len() <= READ_WHOLE_UP_TO)
            .then(|| self.budget.try_hold(metadata.len()))
            .flatten();
        ready(match hold {
            Some(hold) => read_exactly(&mut file, metadata.len()).map(|data| DirectFile::Whole {
                data: Cursor::new(held_bytes(Bytes::from(data), hold)),
                metadata,
            }),
            // tokio's file reads on the blocking pool, one chunk at a time.
            None => Ok(DirectFile::Streamed {
                file: tokio::fs::File::from_std(file),
                metadata,
            }),
        })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        ready(std::fs::metadata(path))
    }
}

impl File for DirectFile {
    type Metadata = std::fs::Metadata;
    type MetadataFuture<'a> = Ready<io::Result<std::fs::Metadata>>;

    fn metadata(&self) -> Self::MetadataFuture<'_> {
        match self {
            DirectFile::Whole { metadata, .. } | DirectFile::Streamed { metadata, .. } => {
                ready(Ok(metadata.clone()))
            }
        }
    }
}

impl AsyncRead for DirectFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DirectFile::Whole { data, .. } => Pin::new(data).poll_read(cx, buf),
            DirectFile::Streamed { file, .. } => Pin::new(file).poll_read(cx, buf),
        }
    }
}

impl AsyncSeek for DirectFile {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        match self.get_mut() {
            DirectFile::Whole { data, .. } => Pin::new(data).start_seek(position),
            DirectFile::Streamed { file, .. } => Pin::new(file).start_seek(position),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut() {
            DirectFile::Whole { data, .. } => Pin::new(data).poll_complete(cx),
            DirectFile::Streamed { file, .. } => Pin::new(file).poll_complete(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_segments_are_found_encoded_or_not() {
        for path in ["/.env", "/css/.git/config", "/%2egit/config", "/a\\.b"] {
            assert!(is_hidden(&route_path(path)), "{path}");
        }
        for path in ["/css/base.css", "/admin/js/core.js", "/a.b/c.d", "/"] {
            assert!(!is_hidden(path), "{path}");
        }
    }

    #[test]
    fn a_file_is_read_to_its_stated_length() {
        let text = b"0123456789";
        assert_eq!(read_exactly(&mut &text[..], 10).expect("read"), text);
        // Grew since it was stat'ed: the length the head announced, no more.
        assert_eq!(read_exactly(&mut &text[..], 4).expect("read"), b"0123");
        // Shrank: an error, never a body shorter than its Content-Length.
        let short = read_exactly(&mut &text[..], 11).expect_err("short");
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        assert!(read_exactly(&mut &b""[..], 0).expect("empty").is_empty());
    }

    #[test]
    fn longest_prefix_wins() {
        let dir = std::env::temp_dir();
        let mount = |url: &str| StaticMount {
            url: url.into(),
            dir: dir.clone(),
            cache_control: None,
            symlinks: SymlinkPolicy::Follow,
            internal: false,
        };
        // The config sorts longest first; StaticFiles keeps that order.
        let files = StaticFiles::new(
            &[mount("/static/admin/"), mount("/static/")],
            &BufferBudget::new(1 << 20),
        );
        let url = |path| files.mount_for(path).map(|m| m.url.as_str());
        assert_eq!(url("/static/admin/base.css"), Some("/static/admin/"));
        assert_eq!(url("/static/app.css"), Some("/static/"));
        assert_eq!(url("/static"), None);
        assert_eq!(url("/media/x.png"), None);
    }
}
