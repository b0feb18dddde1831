//! `workers = N > 1` as nginx does it: N threads, each a single-thread runtime that owns the
//! connections the accept loop hands it, so every task of a request (client connection, HTTP/2
//! streams, upstream connections it opens) runs on one thread and wakes nothing across threads. A
//! multi-thread (work-stealing) runtime cost 4–15 % more CPU per HTTP/1.1 request and 17–22 % per
//! HTTP/2 request on one core, before any cross-core wake-up (BENCHMARKS.md).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::watch;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The worker this thread is (0 off the worker threads, so one worker or a test runtime is worker 0).
pub fn current() -> usize {
    WORKER.get()
}

/// The worker runtimes; dropping this ends their threads (after their connections have drained:
/// `server::run` waits for that first).
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: watch::Sender<bool>,
}

impl Workers {
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("portcullis-worker-{index}"))
                .spawn(move || {
                    WORKER.set(index);
                    runtime.block_on(async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                })?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// Serves an accepted connection on the next worker, round robin. The socket moves to that
    /// worker's reactor (`into_std` then `from_std` there: two `epoll_ctl` calls per connection).
    pub fn serve<F>(&self, tcp: TcpStream, serve: impl FnOnce(TcpStream) -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let std = match tcp.into_std() {
            Ok(std) => std,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand the connection to a worker");
                return;
            }
        };
        self.handles[index].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => tracing::warn!(error = %e, "worker cannot take the connection"),
            }
        });
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_round_robin_and_run_on_the_workers_threads() {
        let workers = Workers::start(2).expect("workers");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (seen, mut names) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let _client = TcpStream::connect(addr).await.expect("connect");
            let (tcp, _) = listener.accept().await.expect("accept");
            let seen = seen.clone();
            workers.serve(tcp, move |tcp| async move {
                let name = std::thread::current().name().map(str::to_owned);
                // The socket is usable on the worker's reactor.
                let _ = seen.send((name, tcp.peer_addr().is_ok()));
            });
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), names.recv());
            got.push(next.await.expect("in time").expect("a report"));
        }
        got.sort();
        let expected = |i: usize| (Some(format!("portcullis-worker-{i}")), true);
        assert_eq!(
            got,
            vec![expected(0), expected(0), expected(1), expected(1)]
        );
    }
}
