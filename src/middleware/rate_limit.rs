//! Per-client request budgets for chosen paths (`[[rate_limit]]`), for the login forms Django does not
//! throttle itself: a token bucket per client address, refilled continuously, checked before the request
//! reaches Gunicorn. Paths match in `route_path`'s normal form, so `/admin/%6Cogin/` spends the
//! `/admin/login/` budget as Django routes it there. Over budget: 429 with `Retry-After` (RFC 6585 §4, RFC 9110 §10.2.3). IPv6 clients
//! are keyed by their /64, which one host usually controls whole. With `[storage] backend = "redis"` the
//! buckets live in Redis (`store::SharedStore`), so a budget holds across replicas; when Redis cannot
//! answer in time, this replica's own buckets decide (serving fails open to local counting).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use super::RequestGate;
use crate::body::ProxyBody;
use crate::config::RateLimitRule;
use crate::context::{ConnInfo, TrustedProxies, client_key};
use crate::metrics::Metrics;
use crate::response::{refusal, set_retry_after};
use crate::route_path::route_path;
use crate::security::{SecurityCause, SecurityEvent};
use crate::store::SharedStore;

/// Buckets kept before full ones (which carry no information) are dropped; past it, new clients go
/// untracked rather than refused, so a flood of addresses cannot lock everyone out.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The rules and every client's buckets. Built per config: a reload starts with fresh budgets.
pub struct RateLimiter {
    rules: Vec<RateLimitRule>,
    trusted_proxies: TrustedProxies,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_client: HashMap<(usize, IpAddr), Bucket>,
    last_prune: Option<Instant>,
}

impl RateLimiter {
    pub fn new(rules: Vec<RateLimitRule>, trusted_proxies: TrustedProxies) -> Self {
        RateLimiter {
            rules,
            trusted_proxies,
            buckets: Mutex::new(Buckets {
                by_client: HashMap::new(),
                last_prune: None,
            }),
        }
    }

    fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules a request spends from, and the client they are counted for; `None` for most requests.
    fn budgets_of<B>(&self, req: &Request<B>) -> Option<(Vec<usize>, IpAddr)> {
        if self.is_empty() {
            return None;
        }
        let path = route_path(req.uri().path());
        let matching: Vec<usize> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| path.starts_with(&rule.path) && rule.methods.contains(req.method()))
            .map(|(index, _)| index)
            .collect();
        if matching.is_empty() {
            return None;
        }
        let conn = req.extensions().get::<ConnInfo>()?;
        let client = client_key(
            self.trusted_proxies
                .client_ip(req.headers(), conn.peer.ip()),
        );
        Some((matching, client))
    }

    /// Takes one request from `rules[index]`'s local bucket for `client`.
    fn take_local(&self, index: usize, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.take(&self.rules, index, client, now)
    }

    /// Takes one request from each of the `matching` rules' local budgets for `client`;
    /// `Err((wait, rule))` when one is spent (every matching budget is still charged).
    fn take_local_budgets(
        &self,
        matching: Vec<usize>,
        client: IpAddr,
        now: Instant,
    ) -> Result<(), (Duration, usize)> {
        let mut verdict = Ok(());
        for index in matching {
            if let Err(wait) = self.take_local(index, client, now)
                && verdict.is_ok()
            {
                verdict = Err((wait, index));
            }
        }
        verdict
    }

    /// The 429 for a spent budget: `Retry-After` in whole seconds, rounded up, so a retry then finds a
    /// token.
    fn over_budget(&self, wait: Duration, index: usize) -> Response<ProxyBody> {
        let path = self
            .rules
            .get(index)
            .map(|r| r.path.as_str())
            .unwrap_or("?");
        let mut response = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit: too many requests from this client",
            SecurityEvent::with_detail(SecurityCause::RateLimited, format!("rate_limit {path}")),
        );
        set_retry_after(&mut response, wait);
        response
    }

    /// The bucket's name in the shared store: the rule as configured (so replicas mid-reload with
    /// another budget do not mix) and the client.
    fn shared_bucket(&self, index: usize, client: IpAddr) -> Option<String> {
        let rule = self.rules.get(index)?;
        let methods: Vec<&str> = rule.methods.iter().map(http::Method::as_str).collect();
        Some(format!(
            "rate:{}:{}:{}/{}ms:{client}",
            rule.path,
            methods.join(","),
            rule.requests,
            rule.per.as_millis()
        ))
    }
}

/// `[[rate_limit]]` on the request path: the budgets in the shared store when there is one, else (and
/// whenever it cannot answer) in this replica.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<RateLimiter>,
    store: Option<Arc<SharedStore>>,
    metrics: Arc<Metrics>,
}

impl RateLimitLayer {
    pub fn new(
        limiter: RateLimiter,
        store: Option<Arc<SharedStore>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        RateLimitLayer {
            limiter: Arc::new(limiter),
            store,
            metrics,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
    store: Option<Arc<SharedStore>>,
    metrics: Arc<Metrics>,
}

type Decided = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<S::Future, Decided>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some((matching, client)) = self.limiter.budgets_of(&req) else {
            return Either::Left(self.inner.call(req));
        };
        let Some(store) = self.store.clone() else {
            return match self
                .limiter
                .take_local_budgets(matching, client, Instant::now())
            {
                Ok(()) => Either::Left(self.inner.call(req)),
                Err((wait, index)) => {
                    let refused = self.limiter.over_budget(wait, index);
                    Either::Right(Box::pin(std::future::ready(Ok(refused))))
                }
            };
        };
        // The ready clone goes with the request (tower's rule for calling after an await).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (limiter, metrics) = (self.limiter.clone(), self.metrics.clone());
        Either::Right(Box::pin(async move {
            let mut verdict = Ok(());
            for index in matching {
                let Some(rule) = limiter.rules.get(index) else {
                    continue;
                };
                let shared = match limiter.shared_bucket(index, client) {
                    Some(name) => store.take_token(&name, rule.requests, rule.per).await.ok(),
                    None => None,
                };
                let taken = match shared {
                    Some(taken) => taken,
                    None => {
                        metrics.rate_limit_counted_locally();
                        limiter.take_local(index, client, Instant::now())
                    }
                };
                if let Err(wait) = taken
                    && verdict.is_ok()
                {
                    verdict = Err((wait, index));
                }
            }
            match verdict {
                Ok(()) => inner.call(req).await,
                Err((wait, index)) => Ok(limiter.over_budget(wait, index)),
            }
        }))
    }
}

impl Buckets {
    /// Takes a token from `rules[index]`'s bucket for `client`.
    fn take(
        &mut self,
        rules: &[RateLimitRule],
        index: usize,
        client: IpAddr,
        now: Instant,
    ) -> Result<(), Duration> {
        let Some(rule) = rules.get(index) else {
            return Ok(());
        };
        let (capacity, per_second) = budget(rule);
        if !self.by_client.contains_key(&(index, client)) && self.by_client.len() >= MAX_TRACKED {
            self.prune(rules, now);
            if self.by_client.len() >= MAX_TRACKED {
                return Ok(());
            }
        }
        let bucket = self.by_client.entry((index, client)).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let refill = now.saturating_duration_since(bucket.updated).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refill).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }

    /// Drops buckets that have refilled completely, at most once a second (it walks the whole map).
    fn prune(&mut self, rules: &[RateLimitRule], now: Instant) {
        if self
            .last_prune
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        self.last_prune = Some(now);
        self.by_client.retain(|(index, _), b| {
            let Some((capacity, per_second)) = rules.get(*index).map(budget) else {
                return false;
            };
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * per_second
                < capacity
        });
    }
}

/// A rule's bucket size and refill rate (tokens per second).
fn budget(rule: &RateLimitRule) -> (f64, f64) {
    let capacity = f64::from(rule.requests);
    (capacity, capacity / rule.per.as_secs_f64())
}

impl RequestGate for RateLimiter {
    fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>> {
        let Some((matching, client)) = self.budgets_of(req) else {
            return Ok(());
        };
        self.take_local_budgets(matching, client, Instant::now())
            .map_err(|(wait, index)| Box::new(self.over_budget(wait, index)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn rule(requests: u32, per_secs: u64) -> RateLimitRule {
        RateLimitRule {
            path: "/admin/login/".into(),
            methods: vec![Method::POST],
            requests,
            per: Duration::from_secs(per_secs),
        }
    }

    fn buckets() -> Buckets {
        Buckets {
            by_client: HashMap::new(),
            last_prune: None,
        }
    }

    #[test]
    fn a_budget_is_spent_then_refilled_over_time() {
        let (rules, mut b, t0) = ([rule(3, 60), rule(3, 60)], buckets(), Instant::now());
        let ip: IpAddr = "203.0.113.9".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(b.take(&rules, 0, ip, t0), Ok(()));
        }
        let wait = b.take(&rules, 0, ip, t0).expect_err("spent");
        assert_eq!(wait, Duration::from_secs(20), "one token per 20 s");
        // Another client and another rule have budgets of their own.
        let other: IpAddr = "203.0.113.10".parse().expect("ip");
        assert_eq!(b.take(&rules, 0, other, t0), Ok(()));
        assert_eq!(b.take(&rules, 1, ip, t0), Ok(()));
        // After 20 s exactly one more request fits.
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(b.take(&rules, 0, ip, t1), Ok(()));
        assert!(b.take(&rules, 0, ip, t1).is_err());
        // Refill never exceeds the budget.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.take(&rules, 0, ip, t2), Ok(()));
        }
        assert!(b.take(&rules, 0, ip, t2).is_err());
    }

    #[test]
    fn full_buckets_are_pruned_and_a_full_table_admits_untracked() {
        let (rules, mut b, t0) = ([rule(2, 2)], buckets(), Instant::now());
        for i in 0..MAX_TRACKED {
            let ip = IpAddr::from(u32::try_from(i).expect("fits").to_be_bytes());
            assert_eq!(b.take(&rules, 0, ip, t0), Ok(()));
        }
        let newcomer: IpAddr = "198.51.100.1".parse().expect("ip");
        // Nobody has refilled yet: the newcomer is admitted without a bucket.
        assert_eq!(b.take(&rules, 0, newcomer, t0), Ok(()));
        assert_eq!(b.by_client.len(), MAX_TRACKED);
        // A second later every bucket is full again and is dropped to make room.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(&rules, 0, newcomer, t1), Ok(()));
        assert_eq!(b.by_client.len(), 1);
    }
}
