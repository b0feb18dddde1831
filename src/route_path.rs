//! The one normalised form of a request path that every path rule matches on (`[[rate_limit]]`,
//! `[[static]]`): the path as Django will route it. Gunicorn percent-decodes the target once before
//! Django sees it (PEP 3333 `PATH_INFO`), so `/admin/%6Cogin/` and `/admin/login%2F` are the login view.
//! Matching the raw target would let such spellings past a rule. The request is forwarded as sent; only
//! the matching uses this form.
//!
//! The form: percent-decoded exactly once (as Gunicorn does; `%252F` stays `%2F`), dot segments resolved
//! (RFC 3986 §5.2.4), and repeated slashes folded into one. Django itself would 404 a path with `//` or
//! `..`, so folding them can only make a rule match more, never less: a throttled or static path cannot
//! hide behind an odd spelling.

use std::borrow::Cow;

/// `path` (origin-form, starting with `/`) in the form path rules match on. Borrowed when the path has
/// nothing to normalise, which is every path an ordinary client sends.
pub fn route_path(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') || is_plain(path) {
        return Cow::Borrowed(path);
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/') {
        trailing_slash = false;
        match segment {
            // Empty: the leading '/', a repeated one, or the last one (then the path ends with '/').
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(segment),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        normal.push('/');
    }
    Cow::Owned(normal)
}

/// No percent escape, no empty segment and no dot segment: already in normal form.
fn is_plain(path: &str) -> bool {
    !path.contains('%')
        && !path.contains("//")
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_the_login_path_are_one_path() {
        for spelling in [
            "/admin/login/",
            "/admin/%6Cogin/",
            "/%61dmin/login/",
            "/admin/login%2F",
            "/admin/login%2f",
            "/admin//login/",
            "//admin/login/",
            "/admin/./login/",
            "/admin/x/../login/",
            "/admin/login/.",
            "/static/../admin/login/",
            "/admin%2Flogin/",
        ] {
            assert_eq!(route_path(spelling), "/admin/login/", "{spelling}");
        }
    }

    #[test]
    fn decoding_happens_once_and_keeps_what_it_cannot_decode() {
        // Gunicorn decodes once: `%252F` reaches Django as `%2F`, not as a slash.
        assert_eq!(route_path("/a%252Fb"), "/a%2Fb");
        assert_eq!(route_path("/a%zzb"), "/a%zzb");
        assert_eq!(route_path("/caf%C3%A9/"), "/café/");
        assert_eq!(route_path("/bad%FF"), "/bad\u{fffd}");
    }

    #[test]
    fn plain_paths_are_borrowed_and_unchanged() {
        for path in [
            "/",
            "/admin/login/",
            "/static/css/base.css",
            "/a.b/c..d/",
            "*",
        ] {
            assert!(matches!(route_path(path), Cow::Borrowed(_)), "{path}");
            assert_eq!(route_path(path), path);
        }
        assert_eq!(route_path("/admin/login"), "/admin/login");
    }

    #[test]
    fn dot_segments_never_climb_above_the_root() {
        assert_eq!(route_path("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(route_path("/.."), "/");
        assert_eq!(route_path("/%2e%2e/%2E%2E/x"), "/x");
    }
}
