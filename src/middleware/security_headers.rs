//! Security response headers (HSTS, CSP, X-Frame-Options, nosniff, Referrer-Policy, Permissions-Policy,
//! COOP) and removal of `Server`/`X-Powered-By`, applied per the config's `override`/`if-absent` modes so
//! a header Django already chose is never sent twice.

use http::HeaderMap;
use http::header::Entry;

use super::HeaderRewrite;
use crate::config::{HeaderMode, HeaderRule, SecurityHeaders};

/// The rules for one listener: HTTPS responses get HSTS, plain-HTTP ones do not (RFC 6797 §7.2).
#[derive(Debug, Clone)]
pub struct SecurityHeaderPolicy {
    rules: Vec<HeaderRule>,
    remove: Vec<http::HeaderName>,
}

impl SecurityHeaderPolicy {
    pub fn for_https(config: &SecurityHeaders) -> Self {
        SecurityHeaderPolicy {
            rules: config
                .https_only_rules
                .iter()
                .chain(&config.rules)
                .cloned()
                .collect(),
            remove: config.remove.clone(),
        }
    }

    pub fn for_plain_http(config: &SecurityHeaders) -> Self {
        SecurityHeaderPolicy {
            rules: config.rules.clone(),
            remove: config.remove.clone(),
        }
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for rule in &self.rules {
            match rule.mode {
                // `insert` replaces every existing value: one header, ours.
                HeaderMode::Override => {
                    headers.insert(rule.name.clone(), rule.value.clone());
                }
                HeaderMode::IfAbsent => {
                    if let Entry::Vacant(slot) = headers.entry(rule.name.clone()) {
                        slot.insert(rule.value.clone());
                    }
                }
            }
        }
    }
}

impl HeaderRewrite for SecurityHeaderPolicy {
    fn rewrite(&self, headers: &mut HeaderMap) {
        self.apply(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(extra: &str) -> SecurityHeaders {
        let text = format!(
            "[server]\ndomains = [\"a.example\"]\n[upstream]\nurl = \"http://127.0.0.1:1\"\n{extra}"
        );
        Config::parse(&text, "t", None)
            .expect("valid config")
            .headers
    }

    #[test]
    fn defaults_fill_in_everything_on_https() {
        let mut headers = HeaderMap::new();
        headers.insert("server", "gunicorn".parse().expect("value"));
        headers.insert("x-powered-by", "Django".parse().expect("value"));
        SecurityHeaderPolicy::for_https(&policy("")).apply(&mut headers);
        assert!(headers.get("server").is_none());
        assert!(headers.get("x-powered-by").is_none());
        assert_eq!(
            headers["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["referrer-policy"], "same-origin");
        assert_eq!(headers["cross-origin-opener-policy"], "same-origin");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .is_ok_and(|v| v.starts_with("default-src 'self'"))
        );
        assert!(headers.contains_key("permissions-policy"));
    }

    #[test]
    fn plain_http_gets_no_hsts() {
        let mut headers = HeaderMap::new();
        SecurityHeaderPolicy::for_plain_http(&policy("")).apply(&mut headers);
        assert!(headers.get("strict-transport-security").is_none());
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }

    #[test]
    fn if_absent_keeps_djangos_choice_and_override_replaces_it_without_duplicates() {
        let mut headers = HeaderMap::new();
        headers.insert("x-frame-options", "SAMEORIGIN".parse().expect("value"));
        headers.append(
            "strict-transport-security",
            "max-age=60".parse().expect("value"),
        );
        headers.append(
            "strict-transport-security",
            "max-age=61".parse().expect("value"),
        );
        SecurityHeaderPolicy::for_https(&policy("")).apply(&mut headers);
        assert_eq!(headers["x-frame-options"], "SAMEORIGIN");
        let hsts: Vec<_> = headers
            .get_all("strict-transport-security")
            .iter()
            .collect();
        assert_eq!(hsts, ["max-age=31536000; includeSubDomains"]);
    }

    #[test]
    fn off_sends_nothing() {
        let mut headers = HeaderMap::new();
        let config = policy(
            "[headers.strict_transport_security]\nmode = \"off\"\n[headers.x_frame_options]\nmode = \"off\"\n",
        );
        SecurityHeaderPolicy::for_https(&config).apply(&mut headers);
        assert!(headers.get("strict-transport-security").is_none());
        assert!(headers.get("x-frame-options").is_none());
    }
}
