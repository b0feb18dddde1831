//! When to renew and when to retry: pure functions, so the policy is tested without a clock or a CA.
//! Renewal follows ACME Renewal Information (RFC 9773 §4.2) when the CA offers it, else a third of the
//! lifetime before expiry; failures back off exponentially with jitter, never sooner than the CA asked.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

use crate::tls::CertInfo;

/// A uniformly distributed fraction in [0, 1), from the process' random hash keys: enough to spread
/// many proxies' renewals apart without a dependency on a random-number crate.
pub fn jitter_fraction() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The moment to renew `cert`.
/// - With an ARI window (RFC 9773 §4.2): a point chosen uniformly inside it.
/// - Without: when a third of the lifetime remains, moved earlier by up to 1/30 of the lifetime so a
///   fleet does not renew in the same second.
pub fn renewal_time(
    cert: &CertInfo,
    ari_window: Option<(SystemTime, SystemTime)>,
    jitter: f64,
) -> SystemTime {
    let jitter = jitter.clamp(0.0, 1.0);
    if let Some((start, end)) = ari_window
        && let Ok(width) = end.duration_since(start)
    {
        return start + width.mul_f64(jitter);
    }
    let lifetime = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap_or_default();
    let at = cert.renew_at();
    at.checked_sub((lifetime / 30).mul_f64(jitter))
        .unwrap_or(at)
}

/// Delay before retry number `failures` (1 = after the first failure): base·2^(failures−1), capped,
/// with ±20% jitter, and never sooner than the CA's own `retry_after`.
pub fn retry_delay(
    failures: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exponent = failures.saturating_sub(1).min(30);
    let backoff = base.saturating_mul(1u32 << exponent).min(max);
    let spread = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    let delay = backoff.mul_f64(spread).min(max);
    match retry_after {
        Some(asked) if asked > delay => asked,
        _ => delay,
    }
}

/// Let's Encrypt writes when a rate limit lifts into the problem detail ("... retry after
/// 2026-11-26 13:00:00 UTC ..."); returns how long until then.
pub fn retry_after_from_detail(detail: &str, now: SystemTime) -> Option<Duration> {
    let start = detail.find("retry after ")? + "retry after ".len();
    let stamp = detail.get(start..start + 19)?;
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let at = time::PrimitiveDateTime::parse(stamp, format)
        .ok()?
        .assume_utc();
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at.unix_timestamp()).ok()?);
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(lifetime_days: u64) -> CertInfo {
        let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        CertInfo {
            names: vec!["example.com".into()],
            not_before,
            not_after: not_before + Duration::from_secs(lifetime_days * 86_400),
        }
    }

    #[test]
    fn without_ari_renews_with_a_third_of_the_lifetime_left() {
        let c = cert(90);
        assert_eq!(
            renewal_time(&c, None, 0.0),
            c.not_before + Duration::from_secs(60 * 86_400)
        );
        let jittered = renewal_time(&c, None, 0.999);
        assert!(jittered < c.not_before + Duration::from_secs(60 * 86_400));
        assert!(jittered > c.not_before + Duration::from_secs(56 * 86_400));
    }

    #[test]
    fn ari_window_wins_and_is_sampled_uniformly() {
        let c = cert(90);
        let start = c.not_before + Duration::from_secs(10 * 86_400);
        let end = start + Duration::from_secs(86_400);
        assert_eq!(renewal_time(&c, Some((start, end)), 0.0), start);
        assert_eq!(
            renewal_time(&c, Some((start, end)), 0.5),
            start + Duration::from_secs(43_200)
        );
        // A window in the past (revocation, RFC 9773 §4.2) means renew now: the caller sees a past time.
        let past = (c.not_before, c.not_before + Duration::from_secs(60));
        assert!(renewal_time(&c, Some(past), 0.7) < SystemTime::now());
        // A malformed window (end before start) falls back to the lifetime rule.
        assert_eq!(renewal_time(&c, Some((end, start)), 0.0), c.renew_at());
    }

    /// Let's Encrypt's lifetimes now and to come: `shortlived` (about 6 days), `tlsserver` and `classic`
    /// moving to 45 days, today's 90. Each renews with a third of its life left (jitter only earlier, by
    /// at most a thirtieth), and the default backoff (1 min doubling to 6 h) leaves room for many retries
    /// before the certificate expires; an ARI window wins over the lifetime rule at any lifetime.
    #[test]
    fn schedules_hold_for_6_45_and_90_day_lifetimes() {
        let (base, max) = (Duration::from_secs(60), Duration::from_secs(6 * 3600));
        for days in [6u64, 45, 90] {
            let c = cert(days);
            let lifetime = Duration::from_secs(days * 86_400);
            let third_left = c.not_after - lifetime / 3;
            assert_eq!(renewal_time(&c, None, 0.0), third_left, "{days} d");
            for jitter in [0.25, 0.5, 0.999] {
                let at = renewal_time(&c, None, jitter);
                assert!(
                    at <= third_left,
                    "{days} d: jitter only moves renewal earlier"
                );
                assert!(
                    at >= third_left - lifetime / 30,
                    "{days} d: by at most 1/30"
                );
            }
            // Retries that fit between the renewal point and expiry, at the slowest jitter.
            let mut spent = Duration::ZERO;
            let mut retries = 0;
            while spent < lifetime / 3 {
                retries += 1;
                spent += retry_delay(retries, base, max, None, 1.0);
            }
            assert!(
                retries >= 8,
                "{days} d: only {retries} retries before expiry"
            );
            // ARI's window is honoured however long the certificate lives.
            let start = c.not_before + lifetime / 2;
            let end = start + Duration::from_secs(3600);
            let at = renewal_time(&c, Some((start, end)), 0.5);
            assert!(start <= at && at <= end, "{days} d: inside the ARI window");
        }
    }

    #[test]
    fn backoff_doubles_caps_and_honours_the_ca() {
        let base = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        let d = |n| retry_delay(n, base, max, None, 0.5);
        assert_eq!(d(1), Duration::from_secs(60));
        assert_eq!(d(2), Duration::from_secs(120));
        assert_eq!(d(3), Duration::from_secs(240));
        assert_eq!(d(20), max);
        assert!(retry_delay(1, base, max, None, 0.0) >= Duration::from_secs(48));
        assert!(retry_delay(1, base, max, None, 1.0) <= Duration::from_secs(72));
        let asked = Duration::from_secs(7200);
        assert_eq!(retry_delay(1, base, max, Some(asked), 0.5), asked);
    }

    #[test]
    fn reads_lets_encrypt_rate_limit_detail() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let later = time::OffsetDateTime::from_unix_timestamp(1_795_003_600).expect("time");
        let detail = format!(
            "too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s, retry after {:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC: see https://letsencrypt.org/docs/rate-limits/",
            later.year(),
            u8::from(later.month()),
            later.day(),
            later.hour(),
            later.minute(),
            later.second()
        );
        assert_eq!(
            retry_after_from_detail(&detail, now),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(retry_after_from_detail("no hint here", now), None);
    }
}
