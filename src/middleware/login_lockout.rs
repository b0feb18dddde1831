//! Failed-login lockout (`[[login_lockout]]`): Django's admin and `LoginView` answer a failed login with
//! the form again (200) and a success with a redirect, so the proxy can count failures per client
//! without reading a body or a username (personal data, and counting by it helps enumeration). After
//! `failures` within `window`, the client's POSTs to the path get 429 with `Retry-After` (RFC 6585 §4)
//! for `lockout`, before Gunicorn sees them. A success clears the count. Attempts still in flight count
//! too, so a burst of parallel guesses cannot slip past the limit before the first answer comes back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};

use super::RequestGuard;
use crate::body::ProxyBody;
use crate::config::LoginLockoutRule;
use crate::context::{ConnInfo, TrustedProxies, client_key};
use crate::response::{refusal, set_retry_after};
use crate::route_path::route_path;
use crate::security::{SecurityCause, SecurityEvent};

/// Clients tracked before expired records are dropped; past it, new clients go uncounted rather than
/// refused, so a flood of addresses cannot lock everyone out.
const MAX_TRACKED: usize = 100_000;

pub struct LoginLockout {
    rules: Arc<[LoginLockoutRule]>,
    trusted_proxies: TrustedProxies,
    records: Arc<Mutex<Records>>,
}

#[derive(Default)]
struct Records {
    by_client: HashMap<(usize, IpAddr), Record>,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    first_failure: Instant,
    locked_until: Option<Instant>,
    in_flight: u32,
}

impl LoginLockout {
    pub fn new(rules: Vec<LoginLockoutRule>, trusted_proxies: TrustedProxies) -> Self {
        LoginLockout {
            rules: rules.into(),
            trusted_proxies,
            records: Arc::new(Mutex::new(Records::default())),
        }
    }
}

/// One login attempt on its way to the app; dropping it (answered or abandoned) takes it out of flight.
pub struct Attempt {
    records: Arc<Mutex<Records>>,
    key: (usize, IpAddr),
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(record) = records.by_client.get_mut(&self.key) {
            record.in_flight = record.in_flight.saturating_sub(1);
        }
    }
}

/// What the app's answer means for the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The failure status: the `n`th within the window; `locked` when it reached the limit.
    Failed {
        n: u32,
        locked: bool,
    },
    Succeeded,
    /// Neither (a CSRF 403, a 500): counts for nothing.
    Other,
}

impl Records {
    /// `Err(wait)` while the client is locked out, or when its failures plus its attempts in flight
    /// have reached the limit; else the attempt is in flight.
    fn begin(
        &mut self,
        rule: &LoginLockoutRule,
        key: (usize, IpAddr),
        now: Instant,
    ) -> Result<bool, Duration> {
        if !self.by_client.contains_key(&key) && self.by_client.len() >= MAX_TRACKED {
            self.prune(now, rule.window);
            if self.by_client.len() >= MAX_TRACKED {
                return Ok(false);
            }
        }
        let record = self.by_client.entry(key).or_insert(Record {
            failures: 0,
            first_failure: now,
            locked_until: None,
            in_flight: 0,
        });
        if let Some(until) = record.locked_until {
            if now < until {
                return Err(until - now);
            }
            record.locked_until = None;
            record.failures = 0;
        }
        if record.failures > 0 && now.duration_since(record.first_failure) >= rule.window {
            record.failures = 0;
        }
        if record.failures + record.in_flight >= rule.failures {
            // Parallel guesses: the answer to one in flight may lock the client out.
            return Err(Duration::from_secs(1));
        }
        record.in_flight += 1;
        Ok(true)
    }

    fn finish(
        &mut self,
        rule: &LoginLockoutRule,
        key: (usize, IpAddr),
        status: StatusCode,
        now: Instant,
    ) -> Outcome {
        let Some(record) = self.by_client.get_mut(&key) else {
            return Outcome::Other;
        };
        if status.is_redirection() {
            // A success clears the count; the record itself goes once nothing is in flight.
            record.failures = 0;
            return Outcome::Succeeded;
        }
        if !rule.failure_status.contains(&status.as_u16()) {
            return Outcome::Other;
        }
        if record.failures == 0 || now.duration_since(record.first_failure) >= rule.window {
            record.failures = 0;
            record.first_failure = now;
        }
        record.failures += 1;
        let locked = record.failures >= rule.failures;
        if locked {
            record.locked_until = Some(now + rule.lockout);
        }
        Outcome::Failed {
            n: record.failures,
            locked,
        }
    }

    /// Drops records that hold nothing: no failure in the window, no lock, nothing in flight.
    fn prune(&mut self, now: Instant, window: Duration) {
        self.by_client.retain(|_, r| {
            r.in_flight > 0
                || r.locked_until.is_some_and(|until| now < until)
                || (r.failures > 0 && now.duration_since(r.first_failure) < window)
        });
    }
}

impl RequestGuard for LoginLockout {
    type Note = Option<Attempt>;

    fn before<B>(&self, req: &mut Request<B>) -> Result<Self::Note, Box<Response<ProxyBody>>> {
        if self.rules.is_empty() || req.method() != Method::POST {
            return Ok(None);
        }
        let path = route_path(req.uri().path());
        let Some((index, rule)) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, rule)| path.starts_with(&rule.path))
        else {
            return Ok(None);
        };
        let Some(conn) = req.extensions().get::<ConnInfo>() else {
            return Ok(None);
        };
        let client = self
            .trusted_proxies
            .client_ip(req.headers(), conn.peer.ip());
        let key = (index, client_key(client));
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        match records.begin(rule, key, Instant::now()) {
            Ok(true) => Ok(Some(Attempt {
                records: self.records.clone(),
                key,
            })),
            Ok(false) => Ok(None),
            Err(wait) => {
                let mut response = refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "login lockout: too many failed logins from this client",
                    SecurityEvent::with_detail(
                        SecurityCause::LockedOut,
                        format!("login_lockout {}", rule.path),
                    ),
                );
                set_retry_after(&mut response, wait);
                Err(Box::new(response))
            }
        }
    }

    fn after(&self, note: Self::Note, response: &mut Response<ProxyBody>) {
        let Some(attempt) = note else {
            return;
        };
        let Some(rule) = self.rules.get(attempt.key.0) else {
            return;
        };
        let outcome = {
            let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            records.finish(rule, attempt.key, response.status(), Instant::now())
        };
        drop(attempt);
        if let Outcome::Failed { n, locked } = outcome {
            let detail = if locked {
                format!(
                    "login_lockout {}: {n} of {} within {}; locked out for {}",
                    rule.path,
                    rule.failures,
                    humantime::format_duration(rule.window),
                    humantime::format_duration(rule.lockout)
                )
            } else {
                format!(
                    "login_lockout {}: {n} of {} within {}",
                    rule.path,
                    rule.failures,
                    humantime::format_duration(rule.window)
                )
            };
            response.extensions_mut().insert(SecurityEvent::with_detail(
                SecurityCause::FailedLogin,
                detail,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> LoginLockoutRule {
        LoginLockoutRule {
            path: "/admin/login/".into(),
            failures: 3,
            window: Duration::from_secs(600),
            lockout: Duration::from_secs(900),
            failure_status: vec![200, 400, 401],
        }
    }

    const KEY: (usize, IpAddr) = (0, IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 5)));

    fn attempt(r: &mut Records, status: StatusCode, now: Instant) -> Result<Outcome, Duration> {
        let rule = rule();
        r.begin(&rule, KEY, now)?;
        let outcome = r.finish(&rule, KEY, status, now);
        if let Some(record) = r.by_client.get_mut(&KEY) {
            record.in_flight -= 1;
        }
        Ok(outcome)
    }

    #[test]
    fn failures_lock_out_and_the_lock_expires() {
        let (mut r, t0) = (Records::default(), Instant::now());
        assert_eq!(
            attempt(&mut r, StatusCode::OK, t0),
            Ok(Outcome::Failed {
                n: 1,
                locked: false
            })
        );
        assert_eq!(
            attempt(&mut r, StatusCode::UNAUTHORIZED, t0),
            Ok(Outcome::Failed {
                n: 2,
                locked: false
            })
        );
        // A CSRF refusal or a server error counts for nothing.
        assert_eq!(
            attempt(&mut r, StatusCode::FORBIDDEN, t0),
            Ok(Outcome::Other)
        );
        assert_eq!(
            attempt(&mut r, StatusCode::OK, t0),
            Ok(Outcome::Failed { n: 3, locked: true })
        );
        let locked = attempt(&mut r, StatusCode::FOUND, t0 + Duration::from_secs(60));
        assert_eq!(locked, Err(Duration::from_secs(840)), "the rest of 15 min");
        // After the lockout the count starts again.
        let later = t0 + Duration::from_secs(901);
        assert_eq!(
            attempt(&mut r, StatusCode::OK, later),
            Ok(Outcome::Failed {
                n: 1,
                locked: false
            })
        );
    }

    #[test]
    fn a_success_clears_the_count_and_old_failures_expire() {
        let (mut r, t0) = (Records::default(), Instant::now());
        for _ in 0..2 {
            assert!(matches!(
                attempt(&mut r, StatusCode::OK, t0),
                Ok(Outcome::Failed { .. })
            ));
        }
        assert_eq!(
            attempt(&mut r, StatusCode::FOUND, t0),
            Ok(Outcome::Succeeded)
        );
        for n in 1..=2 {
            assert_eq!(
                attempt(&mut r, StatusCode::OK, t0),
                Ok(Outcome::Failed { n, locked: false })
            );
        }
        // Outside the window, two old failures no longer count.
        let later = t0 + Duration::from_secs(601);
        assert_eq!(
            attempt(&mut r, StatusCode::OK, later),
            Ok(Outcome::Failed {
                n: 1,
                locked: false
            })
        );
    }

    #[test]
    fn attempts_in_flight_count_against_the_limit() {
        let (mut r, t0, rule) = (Records::default(), Instant::now(), rule());
        for _ in 0..3 {
            assert_eq!(r.begin(&rule, KEY, t0), Ok(true));
        }
        assert!(r.begin(&rule, KEY, t0).is_err(), "a fourth parallel guess");
        let other = (0, IpAddr::from([203, 0, 113, 6]));
        assert_eq!(r.begin(&rule, other, t0), Ok(true), "another client");
    }
}
