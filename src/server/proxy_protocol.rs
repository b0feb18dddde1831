//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary) on accepted connections: from the load
//! balancers in `server.proxy_protocol` the header is required and its source address becomes the
//! client; from anyone else a header is refused. The header is read exactly, so not one byte of what
//! the client sends after it is consumed; parsing is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::context::canonical_ip;
pub use crate::metrics::ProxyHeaderRefusal;

/// The 12-byte signature that opens a v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (spec §2.1).
const V1_MAX: usize = 107;
/// v2 allows 65,535 bytes of addresses and TLVs; a balancer sends addresses and a few small TLVs
/// (authority, unique id, TLS facts), so more than this is refused rather than buffered.
const V2_MAX: usize = 16 + 2048;
/// Both forms are at least this long, so these first bytes are always the header's own.
const SHORTEST: usize = 8;

/// What the bytes read so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read exactly this many more bytes, then ask again.
    Read(usize),
    /// A complete header. `None`: it names no usable client (v2 `LOCAL`, v1 `UNKNOWN`, a Unix socket
    /// or datagram), so the connection's own peer stands, as the spec asks.
    Done(Option<SocketAddr>),
    Refuse(ProxyHeaderRefusal, &'static str),
}

/// The framing decision for a header under construction: how much more to read, or what it is. Pure,
/// so the fuzz target drives it the way `read_header` does.
pub fn next_step(read: &[u8]) -> Step {
    if read.len() < SHORTEST {
        return Step::Read(SHORTEST - read.len());
    }
    if read.starts_with(V1_PREFIX) {
        if !read.ends_with(b"\r\n") {
            return if read.len() >= V1_MAX {
                Step::Refuse(
                    ProxyHeaderRefusal::Malformed,
                    "v1 header longer than 107 bytes",
                )
            } else {
                // The text form has no length field: one byte at a time, never past the CRLF.
                Step::Read(1)
            };
        }
        return match ppp::v1::Header::try_from(read) {
            Ok(header) => Step::Done(match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                ppp::v1::Addresses::Unknown => None,
            }),
            Err(_) => Step::Refuse(ProxyHeaderRefusal::Malformed, "invalid v1 header"),
        };
    }
    if !V2_SIGNATURE.starts_with(&read[..SHORTEST]) {
        return Step::Refuse(ProxyHeaderRefusal::Missing, "no PROXY protocol header");
    }
    if read.len() < 16 {
        return Step::Read(16 - read.len());
    }
    if &read[..12] != V2_SIGNATURE {
        return Step::Refuse(ProxyHeaderRefusal::Missing, "no PROXY protocol header");
    }
    let total = 16 + usize::from(u16::from_be_bytes([read[14], read[15]]));
    if total > V2_MAX {
        return Step::Refuse(ProxyHeaderRefusal::Malformed, "v2 header too long");
    }
    if read.len() < total {
        return Step::Read(total - read.len());
    }
    match ppp::v2::Header::try_from(read) {
        Ok(header) if header.command == ppp::v2::Command::Local => Step::Done(None),
        Ok(header) if header.protocol != ppp::v2::Protocol::Stream => Step::Done(None),
        // TLVs are not used: their bytes are read and dropped.
        Ok(header) => Step::Done(match header.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
            }
            ppp::v2::Addresses::IPv6(a) => {
                Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
            }
            ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
        }),
        Err(_) => Step::Refuse(ProxyHeaderRefusal::Malformed, "invalid v2 header"),
    }
}

/// Drives `next_step` over `input` the way `read_header` does over a socket: what it ends with
/// (`Read(0)`: `input` ran out first) and how many bytes it took. For the tests and the fuzz target.
pub fn frame(input: &[u8]) -> (Step, usize) {
    let mut taken = 0;
    loop {
        match next_step(&input[..taken]) {
            Step::Read(more) if more > 0 && taken + more <= input.len() => taken += more,
            Step::Read(_) => return (Step::Read(0), taken),
            step => return (step, taken),
        }
    }
}

/// The most bytes a header may take before it is refused.
pub const LONGEST: usize = V2_MAX;

/// Why a connection was closed before TLS or HTTP saw it.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct Refused {
    /// `None`: the peer closed without sending a byte, as a balancer's TCP health check does; nothing
    /// to report.
    pub reason: Option<ProxyHeaderRefusal>,
    pub what: &'static str,
}

fn refused(reason: ProxyHeaderRefusal, what: &'static str) -> Refused {
    Refused {
        reason: Some(reason),
        what,
    }
}

/// Who the client on `tcp` is. Off (`trusted` empty): the peer, without reading a byte. From a listed
/// balancer: the address its header carries, read within `timeout`. From anyone else: the peer, after
/// a look (a peek, nothing consumed) that no PROXY header opens the stream, since only the balancers
/// may say who the client is.
pub async fn client_address(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[IpNet],
    timeout: Duration,
) -> Result<SocketAddr, Refused> {
    if trusted.is_empty() {
        return Ok(peer);
    }
    let peer_ip = canonical_ip(peer.ip());
    let deadline = tokio::time::timeout(timeout, async {
        if trusted.iter().any(|net| net.contains(&peer_ip)) {
            read_header(tcp).await.map(|client| client.unwrap_or(peer))
        } else {
            refuse_unexpected_header(tcp).await.map(|()| peer)
        }
    });
    deadline.await.unwrap_or_else(|_| {
        Err(refused(
            ProxyHeaderRefusal::Timeout,
            "no complete PROXY header in time",
        ))
    })
}

async fn read_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, Refused> {
    if tcp.peek(&mut [0u8; 1]).await.unwrap_or(0) == 0 {
        return Err(Refused {
            reason: None,
            what: "closed before sending anything",
        });
    }
    let mut header = Vec::with_capacity(64);
    loop {
        match next_step(&header) {
            Step::Read(more) => {
                let start = header.len();
                header.resize(start + more, 0);
                tcp.read_exact(&mut header[start..]).await.map_err(|_| {
                    refused(
                        ProxyHeaderRefusal::Malformed,
                        "connection closed inside the PROXY header",
                    )
                })?;
            }
            Step::Done(client) => return Ok(client),
            Step::Refuse(reason, what) => return Err(refused(reason, what)),
        }
    }
}

/// A stream from an unlisted peer may not open with a PROXY header. TLS opens with 0x16 and HTTP with a
/// method, so whatever the first segment holds tells.
async fn refuse_unexpected_header(tcp: &mut TcpStream) -> Result<(), Refused> {
    let mut first = [0u8; 12];
    let n = tcp.peek(&mut first).await.unwrap_or(0);
    let first = &first[..n];
    let v1 = first.len() >= V1_PREFIX.len() && first.starts_with(V1_PREFIX);
    // Five bytes: CR LF CR LF NUL is no HTTP request (RFC 9112 §2.2 allows only empty lines first).
    let v2 = first.len() >= 5 && V2_SIGNATURE.starts_with(first);
    if v1 || v2 {
        return Err(refused(
            ProxyHeaderRefusal::Untrusted,
            "PROXY header from a peer not in server.proxy_protocol",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(command);
        out.push(family);
        let len = u16::try_from(addresses.len() + tlvs.len()).expect("short");
        out.extend(len.to_be_bytes());
        out.extend(addresses);
        out.extend(tlvs);
        out
    }

    #[test]
    fn v1_headers_give_the_source_and_consume_nothing_after_them() {
        let input = b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 443\r\n\x16\x03\x01";
        let (step, taken) = frame(input);
        assert_eq!(
            step,
            Step::Done(Some("127.0.0.2:40000".parse().expect("addr")))
        );
        assert_eq!(&input[taken..], b"\x16\x03\x01");
        let input = b"PROXY TCP6 2001:db8::7 ::1 5 443\r\nGET";
        let (step, taken) = frame(input);
        assert_eq!(
            step,
            Step::Done(Some("[2001:db8::7]:5".parse().expect("addr")))
        );
        assert_eq!(&input[taken..], b"GET");
        // UNKNOWN (15 bytes, shorter than a v2 header) keeps the peer.
        let (step, taken) = frame(b"PROXY UNKNOWN\r\nGET / HTTP/1.1");
        assert_eq!((step, taken), (Step::Done(None), 15));
    }

    #[test]
    fn v2_headers_give_the_source_and_skip_tlvs() {
        let addresses = [127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb];
        // An authority TLV (type 2) and a unique id (type 5): read, not used.
        let tlvs = [2, 0, 3, b'a', b'.', b'b', 5, 0, 2, 9, 9];
        let mut input = v2(0x21, 0x11, &addresses, &tlvs);
        input.extend(b"rest");
        let (step, taken) = frame(&input);
        assert_eq!(
            step,
            Step::Done(Some("127.0.0.2:40000".parse().expect("addr")))
        );
        assert_eq!(&input[taken..], b"rest");
        // LOCAL (a balancer's own health check) keeps the peer.
        assert_eq!(frame(&v2(0x20, 0x00, &[], &[])).0, Step::Done(None));
    }

    #[test]
    fn garbage_truncation_and_overlong_headers_are_refused_or_wait() {
        let refusal = |input: &[u8]| match frame(input).0 {
            Step::Refuse(reason, _) => Some(reason),
            _ => None,
        };
        assert_eq!(
            refusal(b"GET / HTTP/1.1\r\n\r\n"),
            Some(ProxyHeaderRefusal::Missing)
        );
        assert_eq!(
            refusal(b"PROXY TCP4 not an address at all\r\n"),
            Some(ProxyHeaderRefusal::Malformed)
        );
        assert_eq!(
            refusal(&[b"PROXY ".as_slice(), &[b'1'; 200]].concat()),
            Some(ProxyHeaderRefusal::Malformed)
        );
        let mut long = V2_SIGNATURE.to_vec();
        long.extend([0x21, 0x11, 0xff, 0xff]);
        assert_eq!(refusal(&long), Some(ProxyHeaderRefusal::Malformed));
        // Truncated: asks for more, never past what the header says.
        let whole = v2(0x21, 0x11, &[127, 0, 0, 2, 127, 0, 0, 1, 0, 1, 0, 2], &[]);
        for cut in 0..whole.len() {
            assert_eq!(frame(&whole[..cut]).0, Step::Read(0), "cut at {cut}");
        }
    }
}
