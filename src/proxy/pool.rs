//! The backends (`[upstream] urls`) and how each request gets one: a balancing policy over those that
//! are up, passive health (consecutive connection failures or timeouts take a backend out for
//! `fail_timeout`, after which one request tries it again) and optional active health checks (`GET
//! health_path` on an interval, with thresholds to go down and to come back). Choosing is a few atomic
//! reads per backend: no lock on the request path.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Request};
use tokio::time::Instant;

use super::upstream::{Reuse, UpstreamClient};
use crate::body::RequestBody;
use crate::config::{BalancePolicy, HealthCheck, UpstreamConfig, UpstreamTarget};
use crate::metrics::BackendGauge;

/// One backend and what is known about it.
pub struct Backend {
    /// As configured (`http://10.0.0.2:8000`, `unix:/run/gunicorn.sock`): for logs and metrics.
    pub name: Arc<str>,
    /// The authority in upstream request URIs: it keys the connection pool, and for unix sockets names
    /// the socket (see `upstream::UpstreamConnector`).
    pub authority: Authority,
    weight: u32,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Passive health: milliseconds since the pool's epoch until which this backend is out (0: in).
    down_until_ms: AtomicU64,
    /// When a request last tried this backend while it was out (see `Pool::choose`).
    last_probe_ms: AtomicU64,
    /// Active health: the checks' verdict.
    failing_checks: AtomicBool,
    check_streak: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
    response_micros: AtomicU64,
    responses: AtomicU64,
}

/// No backend can take a request now; `retry_after` is when one may.
#[derive(Debug, Clone, Copy)]
pub struct AllDown {
    pub retry_after: Duration,
}

pub struct Pool {
    backends: Vec<Arc<Backend>>,
    policy: BalancePolicy,
    /// Backend indices, each repeated by its weight: round robin walks it, and every policy starts its
    /// scan at the next place so ties spread.
    rotation: Vec<usize>,
    next: AtomicUsize,
    epoch: Instant,
    max_fails: u32,
    fail_timeout: Duration,
    health: Option<HealthCheck>,
}

/// A backend chosen for one attempt; counts as in flight on it until dropped.
pub struct Picked {
    pub index: usize,
    pub backend: Arc<Backend>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often a request may try a backend that is out, while none is up.
const PROBE_EVERY_MS: u64 = 1000;

/// The authority that stands for a unix-socket backend in request URIs.
pub fn unix_authority(index: usize) -> Authority {
    Authority::try_from(format!("backend-{index}.unix").as_str())
        .unwrap_or_else(|_| Authority::from_static("localhost"))
}

impl Pool {
    pub fn new(config: &UpstreamConfig) -> Pool {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .enumerate()
            .map(|(index, b)| {
                let authority = match &b.target {
                    UpstreamTarget::Tcp(authority) => authority.clone(),
                    UpstreamTarget::Unix(_) => unix_authority(index),
                };
                Arc::new(Backend {
                    name: b.target.describe().into(),
                    authority,
                    weight: b.weight,
                    in_flight: AtomicUsize::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    down_until_ms: AtomicU64::new(0),
                    last_probe_ms: AtomicU64::new(0),
                    failing_checks: AtomicBool::new(false),
                    check_streak: AtomicU32::new(0),
                    requests: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    response_micros: AtomicU64::new(0),
                    responses: AtomicU64::new(0),
                })
            })
            .collect();
        let rotation = backends
            .iter()
            .enumerate()
            .flat_map(|(i, b)| std::iter::repeat_n(i, b.weight as usize))
            .collect();
        Pool {
            backends,
            policy: config.policy,
            rotation,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            max_fails: config.max_fails,
            fail_timeout: config.fail_timeout,
            health: config.health.clone(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_up(&self, backend: &Backend, now_ms: u64) -> bool {
        !backend.failing_checks.load(Ordering::Relaxed)
            && backend.down_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// A backend for the next attempt, avoiding those in `tried` while another is up (a retry goes
    /// elsewhere when it can, else to the same backend on a new connection). A request that can be sent
    /// again (`replayable`) may be the one a second that tries a backend passive failures took out, so a
    /// Gunicorn restarted by a deploy is back in rotation within a second, not after `fail_timeout`.
    pub fn choose(&self, tried: &[usize], replayable: bool) -> Result<Picked, AllDown> {
        let now_ms = self.now_ms();
        if replayable && let Some(index) = self.probe_one_that_is_out(tried, now_ms) {
            return Ok(self.picked(index));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let pick = |avoid: &[usize]| -> Option<usize> {
            let mut candidates = (0..self.rotation.len())
                .map(|step| self.rotation[(start + step) % self.rotation.len()])
                .filter(|&i| !avoid.contains(&i) && self.is_up(&self.backends[i], now_ms));
            match self.policy {
                BalancePolicy::RoundRobin => candidates.next(),
                BalancePolicy::First => (0..self.backends.len())
                    .find(|&i| !avoid.contains(&i) && self.is_up(&self.backends[i], now_ms)),
                BalancePolicy::LeastRequests => candidates.min_by_key(|&i| {
                    let b = &self.backends[i];
                    // In flight per unit of weight, without floats.
                    (b.in_flight.load(Ordering::Relaxed) as u64 * 1000) / u64::from(b.weight)
                }),
            }
        };
        let index = pick(tried)
            .or_else(|| pick(&[]))
            .or_else(|| self.probe_one_that_is_out(tried, now_ms))
            .ok_or(AllDown {
                retry_after: self.retry_after(now_ms),
            })?;
        Ok(self.picked(index))
    }

    fn picked(&self, index: usize) -> Picked {
        let backend = self.backends[index].clone();
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.requests.fetch_add(1, Ordering::Relaxed);
        Picked { index, backend }
    }

    /// One request a second may try a backend that passive failures took out (never one failing its
    /// health checks): a Gunicorn restarted by a deploy is back long before its `fail_timeout` is over,
    /// and this finds out at once. With none up, every other request gets the 503 meanwhile.
    fn probe_one_that_is_out(&self, tried: &[usize], now_ms: u64) -> Option<usize> {
        // Stored one past the time, so 0 means "never".
        let stamp = now_ms + 1;
        (0..self.backends.len()).find(|&i| {
            let b = &self.backends[i];
            let last = b.last_probe_ms.load(Ordering::Relaxed);
            let out = b.down_until_ms.load(Ordering::Relaxed) > now_ms;
            out && !tried.contains(&i)
                && !b.failing_checks.load(Ordering::Relaxed)
                && (last == 0 || stamp.saturating_sub(last) >= PROBE_EVERY_MS)
                && b.last_probe_ms
                    .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// `Some` when no backend is up: a failed last attempt is then the all-down answer.
    pub fn all_down(&self) -> Option<AllDown> {
        let now_ms = self.now_ms();
        (!self.backends.iter().any(|b| self.is_up(b, now_ms))).then(|| AllDown {
            retry_after: self.retry_after(now_ms),
        })
    }

    /// When a backend may be back: the earliest end of a passive outage, else the next health check.
    fn retry_after(&self, now_ms: u64) -> Duration {
        let passive = self
            .backends
            .iter()
            .filter(|b| !b.failing_checks.load(Ordering::Relaxed))
            .map(|b| {
                b.down_until_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(now_ms)
            })
            .min()
            .map(Duration::from_millis);
        let active = self.health.as_ref().map(|h| h.interval);
        passive
            .into_iter()
            .chain(active)
            .min()
            .unwrap_or(self.fail_timeout)
            .max(Duration::from_secs(1))
            .min(self.fail_timeout.max(Duration::from_secs(1)))
    }

    /// The backend answered: it is healthy as far as requests can tell.
    pub fn record_success(&self, picked: &Picked, response_time: Duration) {
        let b = &picked.backend;
        b.consecutive_failures.store(0, Ordering::Relaxed);
        b.responses.fetch_add(1, Ordering::Relaxed);
        b.response_micros.fetch_add(
            u64::try_from(response_time.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if b.down_until_ms.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(backend = %b.name, "backend answers again; back in rotation");
        }
    }

    /// The backend could not be reached or did not answer in time; `max_fails` in a row take it out.
    /// A lone backend is never taken out this way (as nginx does): with nowhere else to send requests,
    /// trying it costs nothing, and it is back the moment Gunicorn is.
    pub fn record_failure(&self, picked: &Picked) {
        let b = &picked.backend;
        b.failures.fetch_add(1, Ordering::Relaxed);
        let failures = b.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.max_fails && self.backends.len() > 1 {
            let until = self.now_ms() + u64::try_from(self.fail_timeout.as_millis()).unwrap_or(0);
            let was = b.down_until_ms.swap(until.max(1), Ordering::Relaxed);
            if was <= self.now_ms() {
                tracing::warn!(
                    backend = %b.name,
                    failures,
                    out_for = ?self.fail_timeout,
                    "backend failing; out of rotation"
                );
            }
        }
    }

    pub fn snapshot(&self) -> Vec<BackendGauge> {
        let now_ms = self.now_ms();
        self.backends
            .iter()
            .map(|b| BackendGauge {
                name: b.name.to_string(),
                up: self.is_up(b, now_ms),
                in_flight: b.in_flight.load(Ordering::Relaxed),
                requests: b.requests.load(Ordering::Relaxed),
                failures: b.failures.load(Ordering::Relaxed),
                response_seconds_sum: b.response_micros.load(Ordering::Relaxed) as f64 / 1e6,
                responses: b.responses.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Runs the active health checks while the pool lives (a reload builds a new pool; the old one's
    /// task ends with it).
    pub fn spawn_health_checks(self: &Arc<Self>, client: UpstreamClient, host: HeaderValue) {
        let Some(check) = self.health.clone() else {
            return;
        };
        let pool = Arc::downgrade(self);
        tokio::spawn(health_checks(pool, check, client, host));
    }

    fn record_check(&self, backend: &Backend, check: &HealthCheck, passed: bool) {
        let failing = backend.failing_checks.load(Ordering::Relaxed);
        if passed != failing {
            backend.check_streak.store(0, Ordering::Relaxed);
            return;
        }
        // A streak against the current verdict; enough of them flip it.
        let streak = backend.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = if failing {
            check.healthy_threshold
        } else {
            check.unhealthy_threshold
        };
        if streak >= threshold {
            backend.check_streak.store(0, Ordering::Relaxed);
            backend.failing_checks.store(!failing, Ordering::Relaxed);
            if failing {
                backend.consecutive_failures.store(0, Ordering::Relaxed);
                backend.down_until_ms.store(0, Ordering::Relaxed);
                tracing::info!(backend = %backend.name, path = %check.path, "health checks pass; back in rotation");
            } else {
                tracing::warn!(backend = %backend.name, path = %check.path, "health checks fail; out of rotation");
            }
        }
    }
}

async fn health_checks(
    pool: Weak<Pool>,
    check: HealthCheck,
    client: UpstreamClient,
    host: HeaderValue,
) {
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let probes = pool.backends.iter().map(|backend| {
            let (client, host, check) = (client.clone(), host.clone(), &check);
            async move {
                let passed = probe(&client, backend, check, host).await;
                (backend, passed)
            }
        });
        for (backend, passed) in futures_util::future::join_all(probes).await {
            pool.record_check(backend, &check, passed);
        }
    }
}

/// One health check: `GET path` as a browser's request would reach Django (our first domain as `Host`,
/// over HTTPS as far as Django can tell), passed on any 2xx or 3xx within the timeout.
async fn probe(
    client: &UpstreamClient,
    backend: &Backend,
    check: &HealthCheck,
    host: HeaderValue,
) -> bool {
    let Ok(request) = Request::get(check.path.as_str())
        .header(http::header::HOST, host)
        .header("x-forwarded-proto", "https")
        .header(http::header::USER_AGENT, "portcullis-health-check")
        .body(RequestBody::buffered(bytes::Bytes::new()))
    else {
        return false;
    };
    match tokio::time::timeout(
        check.timeout,
        client.request(&backend.authority, request, Reuse::Any),
    )
    .await
    {
        Ok(Ok(response)) => {
            let status = response.status();
            // Read the body so the connection goes back to the pool.
            let _ = tokio::time::timeout(
                check.timeout,
                http_body_util::BodyExt::collect(response.into_body()),
            )
            .await;
            status.is_success() || status.is_redirection()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn config(policy: BalancePolicy, weights: &[u32]) -> UpstreamConfig {
        UpstreamConfig {
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, w)| BackendConfig {
                    target: UpstreamTarget::Tcp(
                        Authority::try_from(format!("127.0.0.1:{}", 8000 + i).as_str())
                            .expect("authority"),
                    ),
                    weight: *w,
                })
                .collect(),
            policy,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle: 1,
            pool_reuse_for_posts: Duration::from_millis(500),
            retries: 2,
            max_fails: 2,
            fail_timeout: Duration::from_secs(10),
            health: None,
        }
    }

    #[tokio::test]
    async fn round_robin_follows_the_weights() {
        let pool = Pool::new(&config(BalancePolicy::RoundRobin, &[2, 1]));
        let mut counts = [0; 2];
        for _ in 0..300 {
            counts[pool.choose(&[], true).expect("up").index] += 1;
        }
        assert_eq!(counts, [200, 100]);
    }

    #[tokio::test]
    async fn least_requests_prefers_the_idle_backend() {
        let pool = Pool::new(&config(BalancePolicy::LeastRequests, &[1, 1]));
        let busy = pool.choose(&[], true).expect("up");
        // While one request is in flight on `busy`, every new one goes to the other.
        for _ in 0..10 {
            assert_ne!(pool.choose(&[], true).expect("up").index, busy.index);
        }
    }

    #[tokio::test]
    async fn first_keeps_to_the_primary_and_retries_go_elsewhere() {
        let pool = Pool::new(&config(BalancePolicy::First, &[1, 1, 1]));
        for _ in 0..5 {
            assert_eq!(pool.choose(&[], true).expect("up").index, 0);
        }
        assert_eq!(pool.choose(&[0], true).expect("up").index, 1);
        // Nowhere else to go: the same backend again (on a new connection).
        let single = Pool::new(&config(BalancePolicy::First, &[1]));
        assert_eq!(single.choose(&[0], true).expect("up").index, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_take_a_backend_out_and_a_probe_a_second_brings_it_back() {
        let pool = Pool::new(&config(BalancePolicy::First, &[1, 1]));
        for _ in 0..2 {
            let picked = pool.choose(&[], false).expect("up");
            assert_eq!(picked.index, 0);
            pool.record_failure(&picked);
        }
        // Out: the backup takes the traffic; a request that cannot be sent again never probes.
        assert_eq!(pool.choose(&[], false).expect("up").index, 1);
        // One replayable request a second tries it again; the others keep to the backup.
        let probe = pool.choose(&[], true).expect("up");
        assert_eq!(probe.index, 0);
        pool.record_failure(&probe);
        assert_eq!(pool.choose(&[], true).expect("up").index, 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = pool.choose(&[], true).expect("up");
        assert_eq!(probe.index, 0);
        pool.record_success(&probe, Duration::from_millis(1));
        assert!(pool.snapshot()[0].up, "back after one good answer");
        assert_eq!(pool.choose(&[], false).expect("up").index, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn all_down_says_when_to_retry() {
        // A lone backend stays in, however often it fails.
        let lone = Pool::new(&config(BalancePolicy::LeastRequests, &[1]));
        for _ in 0..5 {
            let picked = lone.choose(&[], false).expect("up");
            lone.record_failure(&picked);
        }
        assert!(lone.choose(&[], true).is_ok());

        let pool = Pool::new(&config(BalancePolicy::LeastRequests, &[1, 1]));
        for _ in 0..4 {
            let picked = pool.choose(&[], false).expect("up");
            pool.record_failure(&picked);
        }
        // With none up, one request tries each backend that is out, once a second; the rest are told
        // when to come back.
        let probes: Vec<usize> = (0..2)
            .map(|_| pool.choose(&[], true).expect("a probe").index)
            .collect();
        assert_eq!(probes, [0, 1]);
        let down = pool.choose(&[], true).err().expect("all down");
        assert_eq!(down.retry_after, Duration::from_secs(10));
        assert_eq!(
            pool.all_down().map(|d| d.retry_after),
            Some(Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(pool.choose(&[], true).is_ok(), "the next second's probe");
        tokio::time::advance(Duration::from_secs(6)).await;
        let _ = pool.choose(&[], true);
        let _ = pool.choose(&[], true);
        let down = pool.choose(&[], true).err().expect("all down");
        assert_eq!(down.retry_after, Duration::from_secs(3));
    }

    #[tokio::test]
    async fn health_check_thresholds_flip_the_verdict() {
        let mut cfg = config(BalancePolicy::RoundRobin, &[1, 1]);
        let check = HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        cfg.health = Some(check.clone());
        let pool = Pool::new(&cfg);
        let b = pool.backends[0].clone();
        pool.record_check(&b, &check, false);
        pool.record_check(&b, &check, false);
        assert!(pool.snapshot()[0].up, "two failed checks of three");
        pool.record_check(&b, &check, false);
        assert!(!pool.snapshot()[0].up);
        for _ in 0..10 {
            assert_eq!(pool.choose(&[], true).expect("one is up").index, 1);
        }
        pool.record_check(&b, &check, true);
        assert!(!pool.snapshot()[0].up, "one pass of two");
        pool.record_check(&b, &check, true);
        assert!(pool.snapshot()[0].up);
    }
}
