//! The config that the one-line start (`portcullis reverse-proxy --domain … --to …`) and `portcullis init`
//! write. It is TOML text, parsed like any file, so what runs is exactly what `--print-config` shows and a
//! user can move to a file the day they need more.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// What the command line said; everything else keeps its default.
#[derive(Debug, Clone)]
pub struct QuickStart {
    pub domains: Vec<String>,
    /// `127.0.0.1:8000`, `:8000`, `http://host:port` or `unix:/path`, one per backend.
    pub upstreams: Vec<String>,
    pub https: String,
    /// `None`: no plain listener (no redirect, no HTTP-01).
    pub http: Option<String>,
    /// `URL=DIR` pairs: Django's `STATIC_URL` and `STATIC_ROOT`.
    pub statics: Vec<String>,
    pub state_dir: PathBuf,
    pub contact: Option<String>,
    pub acme_directory: Option<String>,
    pub acme_directory_ca: Option<PathBuf>,
    /// The command as typed, for the file's first line.
    pub command_line: String,
}

#[derive(Debug, thiserror::Error)]
pub enum QuickStartError {
    #[error(
        "--domain {local} is served by the local CA and --domain {public} by ACME; one proxy has one \
         certificate source: start one for each, or write a config file"
    )]
    MixedSources { local: String, public: String },
    #[error(
        "--to `{0}`: give Gunicorn's address as 127.0.0.1:8000, :8000, http://host:port or unix:/path"
    )]
    Upstream(String),
    #[error("--static `{0}`: give URL=DIR, like /static/=/srv/app/staticfiles")]
    Static(String),
    #[error("--static `{0}`: {1}")]
    StaticDir(String, std::io::Error),
    #[error("--email `{0}`: give an address like ops@example.com")]
    Contact(String),
}

/// Names no public CA will certify (RFC 6761 special-use and the private suffixes Caddy also serves
/// from its own CA), and IP addresses: the local CA serves these.
pub fn is_local_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return true;
    }
    const PRIVATE: [&str; 7] = [
        "localhost",
        "local",
        "internal",
        "home.arpa",
        "test",
        "example",
        "invalid",
    ];
    PRIVATE
        .iter()
        .any(|suffix| name == *suffix || name.ends_with(&format!(".{suffix}")))
}

/// The state folder when `--state` is not given: systemd's `StateDirectory=`, then the XDG data folder
/// (as Caddy does), then `./portcullis-state`.
pub fn default_state_dir(env: impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(dir) = env("PORTCULLIS_STATE").or_else(|| env("STATE_DIRECTORY")) {
        // systemd may list several, colon-separated; the first is ours.
        return PathBuf::from(dir.split(':').next().unwrap_or(&dir));
    }
    if let Some(data) = env("XDG_DATA_HOME") {
        return Path::new(&data).join("portcullis");
    }
    match env("HOME") {
        Some(home) if home != "/nonexistent" && !home.is_empty() => {
            Path::new(&home).join(".local/share/portcullis")
        }
        _ => PathBuf::from("portcullis-state"),
    }
}

impl QuickStart {
    /// The config file these options amount to, with a comment on each choice made for the user.
    pub fn toml(&self) -> Result<String, QuickStartError> {
        let local = self.domains.iter().find(|d| is_local_name(d));
        let public = self.domains.iter().find(|d| !is_local_name(d));
        if let (Some(local), Some(public)) = (local, public) {
            return Err(QuickStartError::MixedSources {
                local: local.clone(),
                public: public.clone(),
            });
        }
        let acme = public.is_some();
        let upstreams = self
            .upstreams
            .iter()
            .map(|u| upstream_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        let statics = self
            .statics
            .iter()
            .map(|s| static_mount(s))
            .collect::<Result<Vec<_>, _>>()?;

        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored below for that reason.
        let _ = writeln!(out, "# Written by `{}`.", self.command_line);
        out.push_str(
            "# Every key not set here has its default; config/production.example.toml documents them all.\n",
        );
        out.push_str("\n[server]\n");
        let _ = writeln!(out, "https = {}", quoted(&self.https));
        match &self.http {
            Some(http) => {
                let _ = writeln!(
                    out,
                    "http = {}                  # redirects to HTTPS{}",
                    quoted(http),
                    if acme { "; answers ACME HTTP-01" } else { "" }
                );
            }
            None => {
                out.push_str("# http = \"0.0.0.0:80\"          # off: no redirect from http://\n")
            }
        }
        let _ = writeln!(out, "domains = {}", list(&self.domains));

        out.push_str("\n[tls]\n");
        if acme {
            out.push_str("source = \"acme\"                   # Let's Encrypt for public names\n");
        } else {
            out.push_str(
                "source = \"local\"                  # a local CA for localhost and IP addresses; trust its root.crt\n",
            );
        }
        let _ = writeln!(
            out,
            "dir = {}",
            quoted(&absolute(&self.state_dir).display().to_string())
        );

        if acme {
            out.push_str("\n[acme]\n");
            if let Some(directory) = &self.acme_directory {
                let _ = writeln!(out, "directory = {}", quoted(directory));
            }
            if let Some(ca) = &self.acme_directory_ca {
                let _ = writeln!(
                    out,
                    "directory_ca = {}",
                    quoted(&absolute(ca).display().to_string())
                );
            }
            match &self.contact {
                Some(contact) => {
                    let address = contact.strip_prefix("mailto:").unwrap_or(contact);
                    if !address.contains('@') || address.contains(char::is_whitespace) {
                        return Err(QuickStartError::Contact(contact.clone()));
                    }
                    let _ = writeln!(
                        out,
                        "contact = [{}]        # expiry warnings and account recovery",
                        quoted(&format!("mailto:{address}"))
                    );
                }
                None => out.push_str("# contact = [\"mailto:ops@example.com\"]\n"),
            }
        }

        out.push_str("\n[upstream]\n");
        match upstreams.as_slice() {
            [one] => {
                let _ = writeln!(out, "url = {}", quoted(one));
            }
            several => {
                let _ = writeln!(
                    out,
                    "urls = {}   # least requests; a Gunicorn restarting loses no GET",
                    list(several)
                );
            }
        }

        out.push_str(
            "\n# Django's admin takes unlimited password guesses: a budget per client address.\n\
             [[rate_limit]]\npath = \"/admin/login/\"\nrequests = 10\nper = \"1m\"\n\
             \n# And 5 failed logins in 15 minutes lock a client out of it for 15 minutes.\n\
             [[login_lockout]]\npath = \"/admin/login/\"\n\
             \n# What the Content-Security-Policy blocks in browsers, reported to the proxy and logged.\n\
             [csp_reports]\n",
        );
        for (url, dir) in statics {
            out.push_str("\n[[static]]\n");
            let _ = writeln!(out, "url = {}", quoted(&url));
            let _ = writeln!(out, "dir = {}", quoted(&dir.display().to_string()));
        }
        Ok(out)
    }
}

/// Gunicorn's address as `[upstream] url` wants it.
fn upstream_url(given: &str) -> Result<String, QuickStartError> {
    let bad = || QuickStartError::Upstream(given.to_string());
    if given.starts_with("unix:") || given.starts_with("http://") {
        return Ok(given.to_string());
    }
    if given.contains("://") {
        return Err(bad());
    }
    // `:8000` and `8000` mean this host, as Caddy reads them.
    let with_host = match given.strip_prefix(':').unwrap_or(given) {
        port if port.parse::<u16>().is_ok() => format!("127.0.0.1:{port}"),
        _ => given.to_string(),
    };
    match with_host.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(format!("http://{with_host}"))
        }
        _ => Err(bad()),
    }
}

/// `URL=DIR`: the URL gains its slashes, the folder becomes absolute.
fn static_mount(given: &str) -> Result<(String, PathBuf), QuickStartError> {
    let (url, dir) = given
        .split_once('=')
        .filter(|(url, dir)| !url.is_empty() && !dir.is_empty())
        .ok_or_else(|| QuickStartError::Static(given.to_string()))?;
    let url = format!("/{}/", url.trim_matches('/'));
    let dir = std::path::absolute(dir).map_err(|e| QuickStartError::StaticDir(given.into(), e))?;
    Ok((url.replace("//", "/"), dir))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A TOML basic string (TOML 1.0 §String): quotes, backslashes and control characters escaped.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(values: &[String]) -> String {
    let items: Vec<String> = values.iter().map(|v| quoted(v)).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TlsSource, UpstreamTarget};

    fn quick(domains: &[&str], to: &[&str]) -> QuickStart {
        QuickStart {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            upstreams: to.iter().map(|u| u.to_string()).collect(),
            https: "127.0.0.1:0".into(),
            http: Some("127.0.0.1:0".into()),
            statics: vec![],
            state_dir: std::env::temp_dir().join("portcullis-quick"),
            contact: None,
            acme_directory: None,
            acme_directory_ca: None,
            command_line: "portcullis reverse-proxy".into(),
        }
    }

    #[test]
    fn local_names_get_the_local_ca_and_public_ones_acme() {
        for name in [
            "localhost",
            "app.localhost",
            "127.0.0.1",
            "[::1]",
            "nas.home.arpa",
            "x.test",
        ] {
            assert!(is_local_name(name), "{name}");
        }
        for name in ["example.com", "localhost.example.com", "testing.org"] {
            assert!(!is_local_name(name), "{name}");
        }
        let text = quick(&["localhost", "127.0.0.1"], &[":8000"])
            .toml()
            .expect("toml");
        let config = Config::parse(&text, "quick", None).expect("valid");
        assert!(matches!(config.tls.source, TlsSource::Local));
        let text = quick(&["example.com", "www.example.com"], &["127.0.0.1:8000"])
            .toml()
            .expect("toml");
        let config = Config::parse(&text, "quick", None).expect("valid");
        assert!(matches!(config.tls.source, TlsSource::Acme));
        assert_eq!(config.rate_limits.len(), 1, "the admin login budget");
        assert_eq!(config.login_lockouts.len(), 1, "the admin login lockout");
        assert!(config.csp_reports.is_some(), "CSP reports collected");
        let err = quick(&["localhost", "example.com"], &[":8000"])
            .toml()
            .expect_err("mixed");
        assert!(err.to_string().contains("one certificate source"), "{err}");
    }

    #[test]
    fn upstreams_are_read_the_ways_people_type_them() {
        for (given, url) in [
            (":8000", "http://127.0.0.1:8000"),
            ("8000", "http://127.0.0.1:8000"),
            ("127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("app:8000", "http://app:8000"),
            ("http://10.0.0.2:8000", "http://10.0.0.2:8000"),
            ("unix:/run/gunicorn.sock", "unix:/run/gunicorn.sock"),
        ] {
            assert_eq!(upstream_url(given).expect(given), url);
        }
        for bad in ["https://app:8000", "app", ":http", ""] {
            assert!(upstream_url(bad).is_err(), "{bad}");
        }
        let text = quick(&["localhost"], &[":8001", "unix:/run/g.sock"])
            .toml()
            .expect("toml");
        let config = Config::parse(&text, "quick", None).expect("valid");
        assert_eq!(config.upstream.backends.len(), 2);
        assert!(matches!(
            config.upstream.backends[1].target,
            UpstreamTarget::Unix(_)
        ));
    }

    #[test]
    fn awkward_values_stay_one_toml_string() {
        let mut q = quick(&["localhost"], &[":8000"]);
        q.state_dir = PathBuf::from("/tmp/a \"quoted\" \\ dir\n");
        let text = q.toml().expect("toml");
        let config = Config::parse(&text, "quick", None).expect("valid");
        assert_eq!(config.tls.dir, PathBuf::from("/tmp/a \"quoted\" \\ dir\n"));
    }

    #[test]
    fn the_state_folder_follows_systemd_then_xdg_then_home() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            default_state_dir(env(&[
                ("STATE_DIRECTORY", "/var/lib/portcullis:/x"),
                ("HOME", "/root")
            ])),
            PathBuf::from("/var/lib/portcullis")
        );
        assert_eq!(
            default_state_dir(env(&[("XDG_DATA_HOME", "/d"), ("HOME", "/root")])),
            PathBuf::from("/d/portcullis")
        );
        assert_eq!(
            default_state_dir(env(&[("HOME", "/root")])),
            PathBuf::from("/root/.local/share/portcullis")
        );
        assert_eq!(
            default_state_dir(env(&[("HOME", "/nonexistent")])),
            PathBuf::from("portcullis-state")
        );
    }
}
