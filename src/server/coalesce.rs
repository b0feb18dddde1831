//! An HTTP/2 connection's writes gathered into one TLS write per turn of its task. h2 flushes its codec
//! for every DATA frame over 256 bytes (h2 0.4 `FramedWrite::poll_ready`), so each response was its own
//! TLS record and `writev`. Here a flush is held back once, the task woken, and everything the other
//! streams finish meanwhile goes out with it at the first flush of the connection's next poll.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Unwritten bytes held at most: past this a write goes out at once, so a large download streams
/// with bounded memory instead of waiting for the next turn.
const HOLD_UP_TO: usize = 64 * 1024;

/// Room reserved when a held batch starts: a few responses' worth, so it rarely regrows.
const BATCH_START: usize = 8 * 1024;

/// The frame type of RST_STREAM (RFC 9113 §6.4), at this offset of a frame's 9-byte header (§4.1).
const RST_STREAM: u8 = 0x3;
const FRAME_TYPE_AT: usize = 3;

/// Whether a write begins with RST_STREAM. h2 sends one with NO_ERROR after a complete response to a
/// request whose body was not read (RFC 9113 §8.1: the client must keep the response). curl 7.88,
/// Debian 12's, drops the response when the reset comes in the same TLS record, so what is held goes
/// out first, as a record of its own (`tests/curl.rs` refuses a POST over HTTP/2).
fn starts_with_reset(bufs: &[IoSlice<'_>]) -> bool {
    bufs.first()
        .is_some_and(|first| first.len() > FRAME_TYPE_AT && first[FRAME_TYPE_AT] == RST_STREAM)
}

/// Counts the polls of one connection's future (`server::connection::drive` advances it); a flush held
/// back in one poll is written in a later one.
#[derive(Clone, Default)]
pub(super) struct PollTurn(Arc<AtomicU64>);

impl PollTurn {
    pub(super) fn advance(&self) {
        // One writer (the connection's task): a load and a store, no read-modify-write needed.
        let turn = self.0.load(Ordering::Relaxed);
        self.0.store(turn.wrapping_add(1), Ordering::Relaxed);
    }

    fn current(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub(super) struct CoalescedWrites<I> {
    io: I,
    /// Bytes accepted and not yet all given to `io`; freed once written, so an idle connection keeps
    /// no buffer.
    pending: Vec<u8>,
    /// How much of `pending` `io` has taken.
    written: usize,
    /// The turn in which a flush was held back, while one is.
    held_in: Option<u64>,
    turn: PollTurn,
}

impl<I> CoalescedWrites<I> {
    pub(super) fn new(io: I, turn: PollTurn) -> Self {
        CoalescedWrites {
            io,
            pending: Vec::new(),
            written: 0,
            held_in: None,
            turn,
        }
    }

    fn unwritten(&self) -> usize {
        self.pending.len() - self.written
    }
}

impl<I: AsyncWrite + Unpin> CoalescedWrites<I> {
    /// Gives `io` everything held; `Pending` while the socket is full (it wakes the task).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.unwritten() > 0 && starts_with_reset(bufs) {
            ready!(this.poll_drain(cx))?;
        }
        if this.unwritten() + total > HOLD_UP_TO {
            ready!(this.poll_drain(cx))?;
            if total >= HOLD_UP_TO {
                // Nothing held and more than would be: no copy, straight to the connection.
                return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
            }
        }
        if this.pending.capacity() == 0 {
            this.pending.reserve(total.max(BATCH_START));
        }
        for buf in bufs {
            this.pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        // Slices are copied into one batch either way; saying so keeps h2 from copying them first.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unwritten() > 0 {
            let now = this.turn.current();
            match this.held_in {
                None => {
                    // Hold it for one turn: the streams that finish before this task runs again
                    // add their frames to the same write.
                    this.held_in = Some(now);
                    cx.waker().wake_by_ref();
                    return Poll::Ready(Ok(()));
                }
                // Already held this turn, and the task already woken for the next.
                Some(turn) if turn == now => return Poll::Ready(Ok(())),
                Some(_) => ready!(this.poll_drain(cx))?,
            }
        }
        this.held_in = None;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        this.held_in = None;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for CoalescedWrites<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    /// A connection that records each write it is given; `room` bytes at most per write, `Pending`
    /// (and a wake) while `blocked`.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
        blocked: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.blocked {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Harness {
        writer: CoalescedWrites<Recorder>,
        turn: PollTurn,
        wakes: Arc<CountingWaker>,
        waker: Waker,
    }

    impl Harness {
        fn new() -> Self {
            let turn = PollTurn::default();
            let wakes = Arc::new(CountingWaker::default());
            Harness {
                writer: CoalescedWrites::new(Recorder::default(), turn.clone()),
                turn,
                waker: Waker::from(wakes.clone()),
                wakes,
            }
        }
        fn write(&mut self, data: &[u8]) -> Poll<io::Result<usize>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.writer).poll_write(&mut cx, data)
        }
        fn flush(&mut self) -> Poll<io::Result<()>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.writer).poll_flush(&mut cx)
        }
        fn shutdown(&mut self) -> Poll<io::Result<()>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.writer).poll_shutdown(&mut cx)
        }
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::Relaxed)
        }
        fn writes(&self) -> &[Vec<u8>] {
            &self.writer.io.writes
        }
    }

    #[test]
    fn flushes_of_one_turn_leave_together_at_the_next() {
        let mut h = Harness::new();
        for response in [&b"one"[..], b"two", b"three"] {
            assert!(matches!(h.write(response), Poll::Ready(Ok(n)) if n == response.len()));
            assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        }
        assert!(h.writes().is_empty(), "held within the turn");
        assert_eq!(h.wakes(), 1, "the task is woken once to write them");
        h.turn.advance();
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.writes(), [b"onetwothree".to_vec()]);
        assert_eq!(h.writer.io.flushes, 1);
        assert_eq!(
            h.writer.pending.capacity(),
            0,
            "no buffer kept once written"
        );
        // Nothing held: a flush goes straight through, with no wake.
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.wakes(), 1);
        assert_eq!(h.writer.io.flushes, 2);
    }

    #[test]
    fn a_write_that_would_pass_the_limit_goes_out_at_once() {
        let mut h = Harness::new();
        let small = vec![1u8; 1000];
        let large = vec![2u8; HOLD_UP_TO];
        assert!(matches!(h.write(&small), Poll::Ready(Ok(1000))));
        assert!(matches!(h.write(&large), Poll::Ready(Ok(n)) if n == HOLD_UP_TO));
        assert_eq!(
            h.writes(),
            [small, large],
            "what was held, then the large write uncopied"
        );
        assert_eq!(h.writer.unwritten(), 0);
    }

    #[test]
    fn a_full_socket_holds_the_flush_until_it_drains_and_loses_nothing() {
        let mut h = Harness::new();
        assert!(h.write(b"response").is_ready());
        assert!(h.flush().is_ready());
        h.turn.advance();
        h.writer.io.blocked = true;
        assert!(h.flush().is_pending(), "back-pressure reaches h2");
        h.writer.io.blocked = false;
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.writes(), [b"response".to_vec()]);
    }

    #[test]
    fn a_stream_reset_never_shares_a_write_with_what_came_before_it() {
        let mut h = Harness::new();
        let response = b"\x00\x00\x04\x01\x04\x00\x00\x00\x01head";
        let reset = b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x00";
        assert!(h.write(response).is_ready());
        assert!(h.flush().is_ready());
        assert!(h.write(reset).is_ready());
        assert_eq!(h.writes(), [response.to_vec()], "the response went first");
        assert!(h.flush().is_ready());
        h.turn.advance();
        assert!(h.flush().is_ready());
        assert_eq!(h.writes(), [response.to_vec(), reset.to_vec()]);
    }

    #[test]
    fn shutdown_writes_what_is_held_first() {
        let mut h = Harness::new();
        assert!(h.write(b"goaway").is_ready());
        assert!(h.flush().is_ready());
        assert!(matches!(h.shutdown(), Poll::Ready(Ok(()))));
        assert_eq!(h.writes(), [b"goaway".to_vec()]);
        assert!(h.writer.io.shut);
    }
}
