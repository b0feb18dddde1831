//! A minimal HTTP/2 client speaking raw frames (RFC 9113 §4), for requests the h2 crate would refuse to
//! send and clients no library would be: framing faults, floods, and streams that are never read.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Proxy, tls_connect};

pub type HeaderPair<'a> = (&'a [u8], &'a [u8]);

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// An HPACK header block of literal fields without indexing and without Huffman (RFC 7541 §6.2.2).
pub fn header_block(headers: &[HeaderPair]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0x00);
        hpack_string(&mut block, name);
        hpack_string(&mut block, value);
    }
    block
}

/// A string literal with its 7-bit-prefix length (RFC 7541 §5.1, §5.2).
fn hpack_string(block: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    if len < 127 {
        block.push(len as u8);
    } else {
        block.push(127);
        len -= 127;
        while len >= 128 {
            block.push((len % 128 + 128) as u8);
            len /= 128;
        }
        block.push(len as u8);
    }
    block.extend_from_slice(bytes);
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// One frame as read: type, flags, stream and payload.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let code = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]))
    }
}

/// A raw HTTP/2 connection to the proxy.
pub struct Connection {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Connection {
    /// Connects with ALPN h2 and sends the preface and our SETTINGS (`(id, value)` pairs).
    pub async fn open(proxy: &Proxy, settings: &[(u16, u32)]) -> Connection {
        Connection::open_at(proxy.https, &proxy.root, settings).await
    }

    /// `open` for a proxy at `addr` whose local CA root is `root` (one running as its own process).
    pub async fn open_at(addr: SocketAddr, root: &Path, settings: &[(u16, u32)]) -> Connection {
        let tls = tls_connect(addr, "localhost", root, &[b"h2"])
            .await
            .expect("connect");
        let mut connection = Connection {
            tls,
            buf: Vec::new(),
        };
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, 0, &payload));
        connection.write(&out).await;
        connection
    }

    /// Opens, then reads until the server's SETTINGS are acknowledged and its connection window has
    /// grown (hyper sends a WINDOW_UPDATE right after its SETTINGS), so DATA beyond 64 KiB may follow.
    pub async fn open_ready(proxy: &Proxy, settings: &[(u16, u32)]) -> Connection {
        let mut connection = Connection::open(proxy, settings).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut settings_seen, mut window_seen) = (false, false);
        while !(settings_seen && window_seen) {
            let Some(frame) = connection.read_frame(deadline).await else {
                break;
            };
            match (frame.kind, frame.stream) {
                (SETTINGS, 0) if frame.flags & 0x1 == 0 => {
                    settings_seen = true;
                    connection.write(&self::frame(SETTINGS, 0x1, 0, &[])).await;
                }
                (WINDOW_UPDATE, 0) => window_seen = true,
                _ => {}
            }
        }
        connection
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = self.tls.write_all(bytes).await;
    }

    pub async fn headers(&mut self, stream: u32, headers: &[HeaderPair<'_>], end_stream: bool) {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.write(&frame(HEADERS, flags, stream, &header_block(headers)))
            .await;
    }

    /// `data` in DATA frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE).
    pub async fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        let chunks: Vec<&[u8]> = data.chunks(16_384).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let flags = if last && end_stream { END_STREAM } else { 0 };
            self.write(&frame(DATA, flags, stream, chunk)).await;
        }
    }

    /// The next frame, or `None` when the connection closed or `deadline` passed.
    pub async fn read_frame(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let frame = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 16_384];
            match tokio::time::timeout_at(deadline.into(), self.tls.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// What the server did with `stream`: `Ok(first byte of the response header block)` or `Err`
    /// naming a reset, a GOAWAY, a close or silence, within 5 seconds.
    pub async fn outcome(&mut self, stream: u32) -> Result<u8, String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let Some(frame) = self.read_frame(deadline).await else {
                return Err("closed or silent for 5 s".into());
            };
            match (frame.kind, frame.stream) {
                (RST_STREAM, s) if s == stream => {
                    return Err(format!("RST_STREAM code {:?}", frame.error_code()));
                }
                (GOAWAY, _) => return Err(format!("GOAWAY code {:?}", frame.error_code())),
                (HEADERS, s) if s == stream => {
                    return Ok(frame.payload.first().copied().unwrap_or_default());
                }
                (SETTINGS, 0) if frame.flags & 0x1 == 0 => {
                    self.write(&self::frame(SETTINGS, 0x1, 0, &[])).await;
                }
                _ => {}
            }
        }
    }
}

/// Rapid reset (CVE-2023-44487): opens `streams` requests and cancels each at once, in one write.
/// Returns the GOAWAY error code the server answered with, if it did within 5 seconds.
pub async fn rapid_reset(proxy: &Proxy, headers: &[HeaderPair<'_>], streams: u32) -> Option<u32> {
    let mut connection = Connection::open(proxy, &[]).await;
    let block = header_block(headers);
    let mut out = Vec::new();
    for i in 0..streams {
        let stream = 1 + 2 * i;
        out.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
        out.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())); // CANCEL
    }
    connection.write(&out).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(frame) = connection.read_frame(deadline).await {
        if frame.kind == GOAWAY {
            return frame.error_code();
        }
    }
    None
}

/// One request without a body on a fresh connection: what the server did with it (see `outcome`).
pub async fn send(proxy: &Proxy, headers: &[HeaderPair<'_>]) -> Result<u8, String> {
    let mut connection = Connection::open(proxy, &[]).await;
    connection.headers(1, headers, true).await;
    connection.outcome(1).await
}
