//! Cookie hardening: every upstream `Set-Cookie` gains `Secure`, `HttpOnly` and `SameSite` where it lacks
//! them (RFC 6265 §4.1; SameSite from RFC 6265bis §4.1.2.7). Only appends: the name, value and every other
//! attribute (an `Expires` date with its comma included) stay byte for byte.

use http::header::{Entry, SET_COOKIE};
use http::{HeaderMap, HeaderValue};

use super::HeaderRewrite;
use crate::config::{CookiePolicy, SameSite};

#[derive(Debug, Clone)]
pub struct CookieHardening {
    policy: CookiePolicy,
}

impl CookieHardening {
    pub fn new(policy: CookiePolicy) -> Self {
        CookieHardening { policy }
    }
}

impl HeaderRewrite for CookieHardening {
    fn rewrite(&self, headers: &mut HeaderMap) {
        // Each Set-Cookie is its own field line (RFC 6265 §3: never folded into one); harden each.
        if let Entry::Occupied(mut entry) = headers.entry(SET_COOKIE) {
            for value in entry.iter_mut() {
                if let Some(hardened) = harden_set_cookie(value.as_bytes(), &self.policy) {
                    *value = hardened;
                }
            }
        }
    }
}

/// Returns the hardened `Set-Cookie` value, or `None` when it already has every required attribute.
pub fn harden_set_cookie(value: &[u8], policy: &CookiePolicy) -> Option<HeaderValue> {
    let mut parts = value.split(|&b| b == b';');
    let name_value = parts.next().unwrap_or_default();
    let name = trim(name_value.split(|&b| b == b'=').next().unwrap_or_default());

    let (mut has_secure, mut has_http_only, mut same_site) = (false, false, None::<&[u8]>);
    for attribute in parts {
        let mut kv = attribute.splitn(2, |&b| b == b'=');
        let key = trim(kv.next().unwrap_or_default());
        if key.eq_ignore_ascii_case(b"secure") {
            has_secure = true;
        } else if key.eq_ignore_ascii_case(b"httponly") {
            has_http_only = true;
        } else if key.eq_ignore_ascii_case(b"samesite") {
            same_site = Some(trim(kv.next().unwrap_or_default()));
        }
    }

    // Browsers reject `SameSite=None` without `Secure`, so it is added even when `secure = false`.
    let same_site_none = same_site.is_some_and(|v| v.eq_ignore_ascii_case(b"none"))
        || (same_site.is_none() && policy.same_site == Some(SameSite::None));
    let add_secure = !has_secure && (policy.secure || same_site_none);
    let exempt = policy.http_only_exempt.iter().any(|e| e.as_bytes() == name);
    let add_http_only = !has_http_only && policy.http_only && !exempt;
    let add_same_site = match (same_site, policy.same_site) {
        (None, Some(wanted)) => Some(wanted),
        _ => None,
    };
    if !add_secure && !add_http_only && add_same_site.is_none() {
        return None;
    }

    let kept = trim_end_separators(value);
    let mut out = Vec::with_capacity(kept.len() + 40);
    out.extend_from_slice(kept);
    if add_secure {
        out.extend_from_slice(b"; Secure");
    }
    if add_http_only {
        out.extend_from_slice(b"; HttpOnly");
    }
    if let Some(same_site) = add_same_site {
        out.extend_from_slice(b"; ");
        out.extend_from_slice(same_site.attribute().as_bytes());
    }
    HeaderValue::from_bytes(&out).ok()
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// A trailing `;` (some frameworks write `a=b; Path=/;`) would otherwise leave an empty attribute.
fn trim_end_separators(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && (bytes[end - 1] == b';' || bytes[end - 1].is_ascii_whitespace()) {
        end -= 1;
    }
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CookiePolicy {
        CookiePolicy {
            secure: true,
            http_only: true,
            same_site: Some(SameSite::Lax),
            http_only_exempt: vec!["csrftoken".into()],
        }
    }

    fn harden(value: &str) -> String {
        harden_with(value, &policy())
    }

    fn harden_with(value: &str, policy: &CookiePolicy) -> String {
        match harden_set_cookie(value.as_bytes(), policy) {
            Some(v) => String::from_utf8(v.as_bytes().to_vec()).expect("ascii"),
            None => value.to_string(),
        }
    }

    #[test]
    fn adds_what_is_missing() {
        assert_eq!(
            harden("sessionid=abc; Path=/"),
            "sessionid=abc; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn csrftoken_stays_readable_by_javascript() {
        assert_eq!(
            harden("csrftoken=xyz; Max-Age=31449600; Path=/"),
            "csrftoken=xyz; Max-Age=31449600; Path=/; Secure; SameSite=Lax"
        );
    }

    #[test]
    fn exemption_is_by_exact_name() {
        assert!(harden("csrftoken2=x").contains("HttpOnly"));
        assert!(harden("xcsrftoken=x").contains("HttpOnly"));
    }

    #[test]
    fn existing_attributes_are_kept_in_any_case() {
        let full = "a=b; secure; HTTPONLY; samesite=Strict";
        assert_eq!(harden(full), full);
        assert_eq!(
            harden("a=b; SameSite=Strict"),
            "a=b; SameSite=Strict; Secure; HttpOnly"
        );
    }

    #[test]
    fn expires_with_comma_and_odd_values_stay_byte_for_byte() {
        let original =
            "sessionid=\"a,b=c\"; expires=Wed, 21 Oct 2026 07:28:00 GMT; Max-Age=1209600; Path=/";
        assert_eq!(
            harden(original),
            format!("{original}; Secure; HttpOnly; SameSite=Lax")
        );
    }

    #[test]
    fn samesite_none_always_gets_secure() {
        let relaxed = CookiePolicy {
            secure: false,
            ..policy()
        };
        assert_eq!(
            harden_with("a=b; SameSite=None", &relaxed),
            "a=b; SameSite=None; Secure; HttpOnly"
        );
        assert_eq!(harden_with("a=b", &relaxed), "a=b; HttpOnly; SameSite=Lax");
    }

    #[test]
    fn trailing_separators_and_attribute_lookalikes() {
        assert_eq!(
            harden("a=b; Path=/;"),
            "a=b; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        // A value that merely contains the word is not the attribute.
        assert_eq!(
            harden("secure=1"),
            "secure=1; Secure; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            harden("a=Secure"),
            "a=Secure; Secure; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn every_set_cookie_field_is_hardened() {
        let mut headers = HeaderMap::new();
        headers.append(SET_COOKIE, HeaderValue::from_static("csrftoken=1; Path=/"));
        headers.append(
            SET_COOKIE,
            HeaderValue::from_static("sessionid=2; HttpOnly; Path=/"),
        );
        headers.append(
            SET_COOKIE,
            HeaderValue::from_bytes(b"opaque=\xe9t\xe9").expect("obs-text"),
        );
        CookieHardening::new(policy()).rewrite(&mut headers);
        let all: Vec<&[u8]> = headers
            .get_all(SET_COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(
            all,
            [
                &b"csrftoken=1; Path=/; Secure; SameSite=Lax"[..],
                &b"sessionid=2; HttpOnly; Path=/; Secure; SameSite=Lax"[..],
                &b"opaque=\xe9t\xe9; Secure; HttpOnly; SameSite=Lax"[..],
            ]
        );
    }
}
