//! Cookie hardening: every upstream `Set-Cookie` gains `Secure`, `HttpOnly` and `SameSite` where it lacks
//! them (RFC 6265 §4.1; SameSite from RFC 6265bis §4.1.2.7). Only appends: the name, value and every other
//! attribute (an `Expires` date with its comma included) stay byte for byte. The one removal is opt-in:
//! `session_only` cookies lose `Expires` and `Max-Age` (RFC 6265 §5.3 step 3: a session cookie), unless
//! the header deletes the cookie.

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
    let (mut has_lifetime, mut deletes) = (false, false);
    for attribute in parts {
        let mut kv = attribute.splitn(2, |&b| b == b'=');
        let key = trim(kv.next().unwrap_or_default());
        let value = trim(kv.next().unwrap_or_default());
        if key.eq_ignore_ascii_case(b"secure") {
            has_secure = true;
        } else if key.eq_ignore_ascii_case(b"httponly") {
            has_http_only = true;
        } else if key.eq_ignore_ascii_case(b"samesite") {
            same_site = Some(value);
        } else if key.eq_ignore_ascii_case(b"max-age") {
            has_lifetime = true;
            // RFC 6265 §5.2.2: zero or negative expires the cookie at once.
            deletes |= value.first().is_some_and(|b| *b == b'0' || *b == b'-');
        } else if key.eq_ignore_ascii_case(b"expires") {
            has_lifetime = true;
            // Django's delete_cookie writes the epoch.
            deletes |= value.windows(4).any(|w| w == b"1970");
        }
    }
    let drop_lifetime =
        has_lifetime && !deletes && policy.session_only.iter().any(|s| s.as_bytes() == name);

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
    if !add_secure && !add_http_only && add_same_site.is_none() && !drop_lifetime {
        return None;
    }

    let mut out = Vec::with_capacity(value.len() + 40);
    if drop_lifetime {
        let mut attributes = value.split(|&b| b == b';');
        out.extend_from_slice(attributes.next().unwrap_or_default());
        for attribute in attributes {
            let key = trim(attribute.split(|&b| b == b'=').next().unwrap_or_default());
            if key.is_empty()
                || key.eq_ignore_ascii_case(b"max-age")
                || key.eq_ignore_ascii_case(b"expires")
            {
                continue;
            }
            out.push(b';');
            out.extend_from_slice(attribute);
        }
        let end = trim_end_separators(&out).len();
        out.truncate(end);
    } else {
        out.extend_from_slice(trim_end_separators(value));
    }
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
            session_only: Vec::new(),
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
    fn session_only_cookies_lose_their_lifetime_but_deletions_keep_it() {
        let policy = CookiePolicy {
            session_only: vec!["sessionid".into()],
            ..policy()
        };
        assert_eq!(
            harden_with(
                "sessionid=abc; expires=Wed, 16 Dec 2026 10:00:00 GMT; HttpOnly; Max-Age=1209600; Path=/; SameSite=Lax",
                &policy
            ),
            "sessionid=abc; HttpOnly; Path=/; SameSite=Lax; Secure"
        );
        // Logout: Django deletes the cookie with the epoch and Max-Age=0; dropping those would set it.
        let deletion = "sessionid=\"\"; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/; SameSite=Lax";
        assert_eq!(
            harden_with(deletion, &policy),
            format!("{deletion}; Secure; HttpOnly")
        );
        // Other cookies keep theirs.
        assert_eq!(
            harden_with("csrftoken=x; Max-Age=31449600; Path=/", &policy),
            "csrftoken=x; Max-Age=31449600; Path=/; Secure; SameSite=Lax"
        );
        // Already a session cookie with every attribute: untouched.
        let done = "sessionid=abc; Path=/; Secure; HttpOnly; SameSite=Lax";
        assert!(harden_set_cookie(done.as_bytes(), &policy).is_none());
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
