//! pebble, Let's Encrypt's test ACME server (Debian package), with pebble-challtestsrv resolving every
//! name to 127.0.0.1, started on loopback ports for one test and stopped with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use http::StatusCode;

use super::{KillOnDrop, LIMIT, fixed_port, https_get, init_test_logging, tls_connect, wait_for};

/// The name the ACME tests order for (challtestsrv resolves every name to 127.0.0.1).
pub const DOMAIN: &str = "portcullis.test";

/// External account binding credentials pebble is told to require (HMAC key base64url, as CAs issue them).
pub const EAB_KID: &str = "kid-portcullis";
pub const EAB_HMAC_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

pub struct Pebble {
    dir: tempfile::TempDir,
    _pebble: KillOnDrop,
    _dns: KillOnDrop,
    pub directory_url: String,
    pub management: std::net::SocketAddr,
    pub require_eab: bool,
}

impl Pebble {
    /// Starts challtestsrv and pebble validating against the proxy's ports (pebble ignores ports in
    /// URLs and always dials these: acme-testing.md).
    pub async fn start(
        http_port: u16,
        tls_port: u16,
        validity_secs: u64,
        require_eab: bool,
    ) -> Pebble {
        init_test_logging();
        for program in ["pebble", "pebble-challtestsrv"] {
            assert!(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("command -v {program}"))
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "{program} is not installed: run scripts/test.sh (Debian package `pebble`)"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // pebble's own HTTPS certificate, from a throwaway CA the proxy is told to trust.
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf_params = rcgen::CertificateParams::new(vec![
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ])
        .expect("params");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(dir.path().join("https-cert.pem"), leaf.pem()).expect("write");
        std::fs::write(dir.path().join("https-key.pem"), leaf_key.serialize_pem()).expect("write");

        let (listen, management, dns, dns_management) =
            (fixed_port(), fixed_port(), fixed_port(), fixed_port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.path().join("https-cert.pem"),
            "privateKey": dir.path().join("https-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": require_eab,
            "externalAccountMACKeys": { EAB_KID: EAB_HMAC_KEY },
            "certificateValidityPeriod": validity_secs,
        }});
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).expect("write");
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");

        let dns_child = Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns}"),
                "-management",
                &format!("127.0.0.1:{dns_management}"),
            ])
            .args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble-challtestsrv");
        let dns_child = KillOnDrop(dns_child);
        let pebble_child = Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}"), "-strict=false"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble");
        let pebble = Pebble {
            require_eab,
            _pebble: KillOnDrop(pebble_child),
            _dns: dns_child,
            directory_url: format!("https://127.0.0.1:{listen}/dir"),
            management: format!("127.0.0.1:{management}").parse().expect("addr"),
            dir,
        };
        let listen_addr = format!("127.0.0.1:{listen}").parse().expect("addr");
        let ca = pebble.ca();
        wait_for(
            "pebble's directory answers",
            LIMIT,
            || async {
                matches!(
                    https_get(listen_addr, "localhost", &ca, "/dir").await,
                    Ok((StatusCode::OK, _))
                )
                .then_some(())
            },
            || pebble.log(),
        )
        .await;
        pebble
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The root pebble issues under (new at every start), written to a file for the test client; it
    /// outlives this pebble.
    pub async fn issuing_root(&self, into: &Path) -> PathBuf {
        let (status, pem) = https_get(self.management, "localhost", &self.ca(), "/roots/0")
            .await
            .expect("roots");
        assert_eq!(status, StatusCode::OK);
        let path = into.join("issuing-root.pem");
        std::fs::write(&path, pem).expect("write root");
        path
    }
}

/// The serial of the certificate the proxy serves for DOMAIN, verified against `root`.
pub async fn served_leaf(https: u16, root: &Path) -> std::io::Result<Vec<u8>> {
    let addr = format!("127.0.0.1:{https}").parse().expect("addr");
    let tls = tls_connect(addr, DOMAIN, root, &[b"h2", b"http/1.1"]).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    leaf.ok_or_else(|| std::io::Error::other("no certificate"))
}

pub async fn wait_for_certificate(https: u16, root: &Path, pebble: &Pebble) -> Vec<u8> {
    wait_for(
        "a certificate is served",
        Duration::from_secs(60),
        || async { served_leaf(https, root).await.ok() },
        || format!("pebble log:\n{}", pebble.log()),
    )
    .await
}
