//! A call's answer reaches the socket in one write, not two.
//!
//! h2 0.4 holds at most one DATA frame longer than 256 bytes, and flushes it
//! before it takes the next frame (hyperium/h2#902; the fix, h2#903, is not
//! merged). So every gRPC answer longer than that took two `writev`s: its
//! headers and message, then its trailers. Measured with `perf stat` on the
//! pinned serving bench, a 1 × 50 call made 2.1 writes, an empty RPC 1.05;
//! and `writev` was 35% of a 1 × 50 call's CPU (on loopback a write also
//! runs the receiver's TCP processing).
//!
//! [`Coalesced`] sits between h2 and the connection. Writes are copied into
//! a buffer. A flush that follows such a chained DATA frame (h2 hands it
//! over as a vectored write: the frame's head, then its payload) is put
//! off: h2 flushes there only because it cannot take the next frame, and it
//! flushes again before its poll ends, when the trailers (and any other
//! answer ready) join the same write. Every other flush writes at once, so
//! nothing waits on the runtime's queue: putting every flush off to the
//! next poll also merged answers across polls (empty RPC 10.6 → 8.2 µs),
//! but under overload each write then waited behind the queue's whole
//! round, and refusals took 1.5 ms at p50 instead of 0.8. In case h2
//! does not flush again, a flush put off wakes the task, and the next poll
//! writes it (h2 reads the connection first thing in every poll). Past
//! [`LIMIT`] bytes, writes go straight through, so a big answer is neither
//! held nor copied whole. `--coalesce-writes false` writes everything
//! through, as tonic does alone (the serving bench runs both, side by
//! side).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes held at most before they are written through.
const LIMIT: usize = 64 * 1024;

/// What an idle connection keeps of its buffer.
const KEEP: usize = 16 * 1024;

pub struct Coalesced<T> {
    inner: T,
    /// Bytes held at most: [`LIMIT`], or 0 to write everything through.
    hold: usize,
    pending: Vec<u8>,
    /// Of `pending`, already written.
    written: usize,
    /// The last write was a DATA frame h2 chained: it will flush again.
    chained: bool,
    /// A flush was put off (and the task woken).
    deferred: bool,
}

impl<T> Coalesced<T> {
    /// Coalescing writes, or not (`coalesce` false: every write goes
    /// straight to `inner`).
    pub fn new(inner: T, coalesce: bool) -> Coalesced<T> {
        Coalesced { inner, hold: if coalesce { LIMIT } else { 0 }, pending: Vec::new(), written: 0, chained: false, deferred: false }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes what is pending.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.pending.shrink_to(KEEP);
        self.written = 0;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: `Ready(true)` if they should be
    /// held, `Ready(false)` if written straight through.
    fn room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.pending.len() + len > self.hold {
            ready!(self.drain(cx))?;
        }
        Poll::Ready(Ok(len <= self.hold && self.hold > 0))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if !ready!(self.room(cx, buf.len()))? {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        self.pending.extend_from_slice(buf);
        self.chained = false;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(self.room(cx, len))? {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        bufs.iter().for_each(|b| self.pending.extend_from_slice(b));
        self.chained = bufs.iter().filter(|b| !b.is_empty()).count() > 1;
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            if self.chained && !self.deferred {
                self.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(self.drain(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // A new poll of the task: what an earlier one put off goes out now.
        // A full socket does not stop the read: its waker is registered.
        if !self.pending.is_empty()
            && let Poll::Ready(Err(e)) = self.drain(cx)
        {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Connected> Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> T::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use futures::task::{ArcWake, waker};

    use super::*;

    /// Records each write it is given; `room` bytes at most per write.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        room: Option<usize>,
    }

    impl AsyncWrite for Socket {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = self.room.map_or(buf.len(), |room| room.min(buf.len()));
            match n {
                0 => Poll::Pending,
                n => {
                    self.writes.push(buf[..n].to_vec());
                    Poll::Ready(Ok(n))
                }
            }
        }

        /// Writes all slices at once, as a socket does.
        fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
            self.poll_write(cx, &bufs.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>())
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(io: &mut Coalesced<Socket>, cx: &mut Context<'_>, bytes: &[u8]) {
        assert!(matches!(Pin::new(io).poll_write(cx, bytes), Poll::Ready(Ok(n)) if n == bytes.len()));
    }

    /// As h2 writes a DATA frame it chained: head and payload, vectored.
    fn write_chained(io: &mut Coalesced<Socket>, cx: &mut Context<'_>, head: &[u8], payload: &[u8]) {
        let slices = [io::IoSlice::new(head), io::IoSlice::new(payload)];
        assert!(matches!(Pin::new(io).poll_write_vectored(cx, &slices), Poll::Ready(Ok(n)) if n == head.len() + payload.len()));
    }

    fn flush(io: &mut Coalesced<Socket>, cx: &mut Context<'_>) {
        assert!(matches!(Pin::new(io).poll_flush(cx), Poll::Ready(Ok(()))));
    }

    fn counting() -> (Arc<Wakes>, std::task::Waker) {
        let wakes = Arc::new(Wakes::default());
        (wakes.clone(), waker(wakes))
    }

    #[test]
    fn an_answer_and_its_trailers_go_out_in_one_write() {
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Socket::default(), true);
        write_chained(&mut io, &mut cx, b"head", b"message");
        flush(&mut io, &mut cx);
        assert!(io.inner.writes.is_empty(), "the flush after a chained frame is put off");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "and the task woken, so it is not forgotten");
        write(&mut io, &mut cx, b"trailers");
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes, vec![b"headmessagetrailers".to_vec()]);
    }

    #[test]
    fn other_flushes_write_at_once() {
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Socket::default(), true);
        write(&mut io, &mut cx, b"headers, small message, trailers");
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes, vec![b"headers, small message, trailers".to_vec()]);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0, "nothing waits for another turn");
    }

    #[test]
    fn what_a_poll_put_off_goes_out_when_the_next_one_reads() {
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Socket::default(), true);
        write_chained(&mut io, &mut cx, b"head", b"part of a stream");
        flush(&mut io, &mut cx);
        assert!(io.inner.writes.is_empty());
        let mut space = [0u8; 16];
        let mut read = ReadBuf::new(&mut space);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut read).is_pending());
        assert_eq!(io.inner.writes, vec![b"headpart of a stream".to_vec()]);
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes.len(), 1, "nothing left to write");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_socket_holds_the_flush_and_nothing_is_lost() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Socket { room: Some(4), ..Socket::default() }, true);
        write(&mut io, &mut cx, b"0123456789");
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes.concat(), b"0123456789", "4 bytes a write, and writes go on until all is out");
        io.inner.room = Some(0);
        write(&mut io, &mut cx, b"abc");
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending(), "the socket is full: the flush waits");
        io.inner.room = None;
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_ready());
        assert_eq!(io.inner.writes.concat(), b"0123456789abc");
    }

    #[test]
    fn big_writes_go_straight_through() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Socket::default(), true);
        write(&mut io, &mut cx, b"small");
        let big = vec![7u8; LIMIT + 1];
        write(&mut io, &mut cx, &big);
        assert_eq!(io.inner.writes, vec![b"small".to_vec(), big], "what was held goes first, in order");
        assert!(io.pending.is_empty());
    }

    #[test]
    fn turned_off_every_write_goes_through_at_once() {
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Socket::default(), false);
        write_chained(&mut io, &mut cx, b"head", b"message");
        write(&mut io, &mut cx, b"trailers");
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes, vec![b"headmessage".to_vec(), b"trailers".to_vec()]);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
    }
}
