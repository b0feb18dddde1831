//! The security event log: one stream (tracing target `portcullis::security`, in `log.format`) of every
//! request or connection the proxy refused or found suspicious, each with the client, host, path and
//! cause, for monitoring and fail2ban (`packaging/fail2ban/`). Refusals mark their response with a
//! `SecurityEvent`; `middleware::record` writes it and counts it by cause, so each is written once.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a request or connection was refused or noted. The names are the `cause` field and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityCause {
    /// A Host (or SNI) not served here, on a port not used, or malformed.
    ForeignHost,
    /// A `[[rate_limit]]` budget spent.
    RateLimited,
    /// An unsafe cross-origin request refused (`cross_origin.mode = "enforce"`).
    CrossOriginRefused,
    /// An unsafe cross-origin request let through in `report` mode.
    CrossOriginReported,
    /// A failed login (the login form answered again) on a `[[login_lockout]]` path.
    FailedLogin,
    /// A client locked out after too many failed logins.
    LockedOut,
    /// A head or body over `limits`.
    TooLarge,
    /// Framing or a head that hyper or our checks refuse (smuggling attempts land here).
    Malformed,
    /// TLS handshakes that failed; aggregated, one event per interval.
    TlsHandshake,
    /// A browser reported a Content-Security-Policy violation (`[csp_reports]`).
    CspReport,
}

impl SecurityCause {
    pub const ALL: [SecurityCause; 10] = [
        SecurityCause::ForeignHost,
        SecurityCause::RateLimited,
        SecurityCause::CrossOriginRefused,
        SecurityCause::CrossOriginReported,
        SecurityCause::FailedLogin,
        SecurityCause::LockedOut,
        SecurityCause::TooLarge,
        SecurityCause::Malformed,
        SecurityCause::TlsHandshake,
        SecurityCause::CspReport,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SecurityCause::ForeignHost => "foreign_host",
            SecurityCause::RateLimited => "rate_limited",
            SecurityCause::CrossOriginRefused => "cross_origin_refused",
            SecurityCause::CrossOriginReported => "cross_origin_reported",
            SecurityCause::FailedLogin => "failed_login",
            SecurityCause::LockedOut => "locked_out",
            SecurityCause::TooLarge => "too_large",
            SecurityCause::Malformed => "malformed",
            SecurityCause::TlsHandshake => "tls_handshake",
            SecurityCause::CspReport => "csp_report",
        }
    }
}

/// Set on a response (as an extension) whose request was refused or noted; `detail` says what was seen
/// (the foreign Origin, the rule's path), never a secret.
#[derive(Debug, Clone)]
pub struct SecurityEvent {
    pub cause: SecurityCause,
    pub detail: Option<String>,
}

impl SecurityEvent {
    pub fn new(cause: SecurityCause) -> Self {
        SecurityEvent {
            cause,
            detail: None,
        }
    }

    pub fn with_detail(cause: SecurityCause, detail: impl Into<String>) -> Self {
        SecurityEvent {
            cause,
            detail: Some(detail.into()),
        }
    }
}

/// Where an event happened: what the request (or connection) said about itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventPlace<'a> {
    pub client: Option<IpAddr>,
    pub host: Option<&'a str>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
}

/// Writes one event. The text form puts `client=` at a fixed place for fail2ban's `<HOST>`.
pub fn write_event(event: &SecurityEvent, place: EventPlace<'_>, count: u64) {
    tracing::warn!(
        target: "portcullis::security",
        cause = %event.cause.as_str(),
        client = place.client.map(tracing::field::display),
        host = place.host,
        method = place.method,
        path = place.path,
        detail = event.detail.as_deref(),
        count = (count > 1).then_some(count),
        "security event"
    );
}

/// TLS handshake failures are what every scanner on the internet produces: one line per failure would
/// drown the log, so they are counted and written at most once per `interval`, with the last client.
pub struct HandshakeFailureLog {
    interval: Duration,
    state: Mutex<HandshakeFailures>,
}

struct HandshakeFailures {
    since_last: u64,
    last_written: Option<Instant>,
}

impl HandshakeFailureLog {
    pub fn new(interval: Duration) -> Self {
        HandshakeFailureLog {
            interval,
            state: Mutex::new(HandshakeFailures {
                since_last: 0,
                last_written: None,
            }),
        }
    }

    /// Counts one failure; writes an event (with the count since the last one) when the interval is up.
    /// Returns whether it wrote.
    pub fn record(&self, client: IpAddr, reason: &str, now: Instant) -> bool {
        let count = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.since_last += 1;
            if state
                .last_written
                .is_some_and(|last| now.duration_since(last) < self.interval)
            {
                return false;
            }
            state.last_written = Some(now);
            std::mem::take(&mut state.since_last)
        };
        let event = SecurityEvent::with_detail(SecurityCause::TlsHandshake, reason);
        let place = EventPlace {
            client: Some(client),
            ..EventPlace::default()
        };
        write_event(&event, place, count);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_are_written_once_per_interval_with_their_count() {
        let log = HandshakeFailureLog::new(Duration::from_secs(60));
        let client: IpAddr = "192.0.2.7".parse().expect("ip");
        let start = Instant::now();
        assert!(log.record(client, "no certificate for this name", start));
        for second in 1..=59 {
            assert!(!log.record(client, "bad", start + Duration::from_secs(second)));
        }
        assert!(log.record(client, "bad", start + Duration::from_secs(60)));
        let state = log.state.lock().expect("lock");
        assert_eq!(state.since_last, 0, "the 60 counted went into the line");
    }

    #[test]
    fn cause_names_are_unique() {
        let mut names: Vec<_> = SecurityCause::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SecurityCause::ALL.len());
    }
}
