//! The container image built from the real Dockerfile (`scripts/image.sh`), run with podman the way a
//! sidecar runs: as uid 10001, binding 443 and 80 itself, state in the `/certs` volume, config mounted
//! read-only. Host networking (the only podman network here), so every port is a loopback port of this
//! machine. Run with `--include-ignored`; scripts/test.sh builds the image first.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::pebble::{DOMAIN, Pebble, served_leaf, wait_for_certificate};
use common::*;
use http::StatusCode;

const UID: u32 = 10001;

fn image() -> String {
    let image = std::env::var("PORTCULLIS_TEST_IMAGE")
        .unwrap_or_else(|_| "localhost/portcullis:test".to_string());
    let exists = podman(&["image", "exists", &image]);
    assert!(
        exists.status.success(),
        "the image {image} is missing: run scripts/image.sh (scripts/test.sh does)"
    );
    image
}

/// podman with the runtime that works here (crun fails on this machine's cgroups: containers.md).
fn podman(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("120")
        .args(["podman", "--runtime", "runc"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("podman is installed (scripts/test.sh installs it)")
}

/// A container removed (killed if need be) when the test ends, pass or fail.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.0]);
    }
}

impl Container {
    /// Starts `image` detached with the given mounts and arguments; `None` args keep the image's CMD.
    fn start(image: &str, mounts: &[(&Path, &str)], args: &[&str]) -> Container {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "portcullis-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut run = vec![
            "run".to_string(),
            "--detach".into(),
            "--name".into(),
            name.clone(),
            "--network".into(),
            "host".into(),
            // Without these two podman fails here: "setrlimit RLIMIT_NOFILE: Operation not permitted".
            "--ulimit".into(),
            "nofile=1024:1024".into(),
            "--ulimit".into(),
            "nproc=1024:1024".into(),
        ];
        for (host, inside) in mounts {
            run.push("--volume".into());
            run.push(format!("{}:{inside}", host.display()));
        }
        run.push(image.to_string());
        run.extend(args.iter().map(|a| a.to_string()));
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        let out = podman(&run);
        assert!(
            out.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container(name)
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.0]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    async fn wait_for_log(&self, needle: &str) -> String {
        wait_for(
            &format!("the container logs {needle:?}"),
            LIMIT,
            || async {
                let logs = self.logs();
                logs.lines()
                    .find(|l| l.contains(needle))
                    .map(str::to_string)
            },
            || self.logs(),
        )
        .await
    }

    /// The container's main process as the host sees it.
    fn pid(&self) -> u32 {
        let out = podman(&["inspect", "--format", "{{.State.Pid}}", &self.0]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no pid: {}", self.logs()))
    }
}

/// A folder the container's user may write (the `/certs` volume).
fn volume() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(dir.path(), Some(UID), Some(UID)).expect("chown to the image's user");
    dir
}

/// The config in a folder the container's user may read (tempdir makes folders 0700).
fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
#[ignore = "needs podman and the image: run scripts/test.sh"]
fn without_a_config_the_image_says_where_to_mount_one() {
    let image = image();
    let user = podman(&["image", "inspect", "--format", "{{.Config.User}}", &image]);
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "10001:10001");
    let size = podman(&["image", "inspect", "--format", "{{.Size}}", &image]);
    let bytes: u64 = String::from_utf8_lossy(&size.stdout)
        .trim()
        .parse()
        .expect("size");
    println!("image {image}: {} MB", bytes / 1_000_000);
    assert!(bytes < 40_000_000, "the image grew to {bytes} bytes");

    let started = std::time::Instant::now();
    let out = podman(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &image,
    ]);
    assert_eq!(out.status.code(), Some(1), "exits with an error");
    assert!(started.elapsed() < LIMIT, "fails at once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/etc/portcullis/portcullis.toml: cannot read the config file")
            && stderr.contains("-v ./portcullis.toml:/etc/portcullis/portcullis.toml:ro"),
        "{stderr}"
    );
}

/// The local CA default on the privileged ports, as uid 10001; then SIGTERM with a request in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs podman and the image: run scripts/test.sh"]
async fn the_image_serves_https_on_443_without_root_and_drains_on_sigterm() {
    let image = image();
    let upstream = Upstream::start().await;
    let config_dir = tempfile::tempdir().expect("tempdir");
    let certs = volume();
    let config = write_config(
        config_dir.path(),
        &format!(
            "[server]\nhttps = \"127.0.0.1:443\"\nhttp = \"127.0.0.1:80\"\ndomains = [\"localhost\"]\n\
             shutdown_grace = \"10s\"\n[tls]\nsource = \"local\"\ndir = \"/certs\"\n\
             [upstream]\nurl = \"http://{}\"\n",
            upstream.addr
        ),
    );
    let container = Container::start(
        &image,
        &[
            (&config, "/etc/portcullis/portcullis.toml:ro"),
            (certs.path(), "/certs"),
        ],
        &[],
    );
    container.wait_for_log("portcullis is serving").await;

    // Not root, and no capability beyond the one on the binary.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", container.pid())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        field("Uid:")
            .split_whitespace()
            .skip(1)
            .all(|u| u == "10001"),
        "{status}"
    );
    assert!(field("CapEff:").ends_with("0000000000000400"), "{status}");

    let root = certs.path().join("local/root.crt");
    let https = "127.0.0.1:443".parse().expect("addr");
    let mut client = Client::connect(https, "localhost", &root, &[b"h2"])
        .await
        .expect("TLS on 443 from the local CA");
    let (response, body) = client.get("/echo", 443).await;
    assert_eq!(response.status(), StatusCode::OK, "{body}");
    assert!(response.headers().contains_key("strict-transport-security"));
    let redirect = plain_exchange(
        "127.0.0.1:80".parse().expect("addr"),
        "GET /admin/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        redirect.starts_with("HTTP/1.1 308")
            && redirect.contains("location: https://localhost/admin/"),
        "{redirect}"
    );

    // SIGTERM while a request waits on the upstream: it completes, and the process exits 0.
    let slow = tokio::spawn(async move { client.get("/hold", 443).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kill = podman(&["kill", "--signal", "TERM", &container.0]);
    assert!(kill.status.success());
    let (response, body) = tokio::time::timeout(LIMIT, slow)
        .await
        .expect("the request in flight finishes")
        .expect("task");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body, "held");
    let waited = podman(&["wait", &container.0]);
    assert_eq!(
        String::from_utf8_lossy(&waited.stdout).trim(),
        "0",
        "{}",
        container.logs()
    );
    assert!(container.logs().contains("stopped"));
}

/// ACME from inside the container against this machine's pebble: the certificate lands in the
/// `/certs` volume, and a new container on the same volume serves it without ordering again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs podman, the image and pebble: run scripts/test.sh"]
async fn acme_in_the_image_keeps_its_certificate_in_the_volume() {
    let image = image();
    let (https, http, metrics) = (fixed_port(), fixed_port(), fixed_port());
    let pebble = Pebble::start(http, https, 3600, false).await;
    let upstream = Upstream::start().await;
    let config_dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(pebble.ca(), config_dir.path().join("pebble-ca.pem")).expect("copy CA");
    let certs = volume();
    write_config(
        config_dir.path(),
        &format!(
            "[server]\nhttps = \"127.0.0.1:{https}\"\nhttp = \"127.0.0.1:{http}\"\ndomains = [\"{DOMAIN}\"]\n\
             [tls]\nsource = \"acme\"\ndir = \"/certs\"\n\
             [acme]\ndirectory = \"{}\"\ndirectory_ca = \"/etc/portcullis/pebble-ca.pem\"\nchallenge = \"tls-alpn-01\"\n\
             [upstream]\nurl = \"http://{}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            pebble.directory_url, upstream.addr
        ),
    );
    let mounts = [
        (config_dir.path(), "/etc/portcullis:ro"),
        (certs.path(), "/certs"),
    ];
    let root = pebble.issuing_root(config_dir.path()).await;
    let orders = || async {
        let text = scrape_metrics(format!("127.0.0.1:{metrics}").parse().expect("addr")).await;
        text.lines()
            .find(|l| l.starts_with("portcullis_acme_orders_total"))
            .and_then(|l| l.split_whitespace().last())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no order count in\n{text}"))
    };

    let first = Container::start(&image, &mounts, &[]);
    let issued = wait_for_certificate(https, &root, &pebble).await;
    assert_eq!(orders().await, "1", "{}", first.logs());
    assert!(certs.path().join("acme").is_dir(), "stored in the volume");
    drop(first);

    let second = Container::start(&image, &mounts, &[]);
    second.wait_for_log("portcullis is serving").await;
    let served = wait_for(
        "the new container serves",
        LIMIT,
        || async { served_leaf(https, &root).await.ok() },
        || second.logs(),
    )
    .await;
    assert_eq!(served, issued, "the stored certificate, not a new one");
    assert_eq!(orders().await, "0", "{}", second.logs());
}

/// The stand-in for the app container: "collectstatic" into the shared volume, then an app on
/// 127.0.0.1:8000 that says what it was told about the request.
const APP: &str = r#"
import http.server, json, os
os.makedirs("/srv/static/css", exist_ok=True)
with open("/srv/static/css/app.css", "w") as f:
    f.write("body { color: #123; }\n")
class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"proto": self.headers.get("X-Forwarded-Proto"),
                           "host": self.headers.get("Host"),
                           "peer": self.client_address[0]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", 8000), App).serve_forever()
"#;

/// A browser's view from inside the shared network namespace, trusting the local CA's root.
const CLIENT: &str = r#"
import http.client, json, ssl
tls = ssl.create_default_context(cafile="/tmp/root.crt")
out = {}
for path in ["/static/css/app.css", "/whoami/"]:
    c = http.client.HTTPSConnection("localhost", 443, context=tls, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    out[path] = {"status": r.status, "body": r.read().decode(),
                 "hsts": r.getheader("Strict-Transport-Security")}
c = http.client.HTTPConnection("localhost", 80, timeout=10)
c.request("GET", "/admin/")
r = c.getresponse()
out["redirect"] = {"status": r.status, "location": r.getheader("Location")}
print(json.dumps(out))
"#;

/// docker-compose.yml's shape under podman: the app container owns a private network namespace (no
/// network but loopback), portcullis joins it (`network_mode: service:app` is `--network container:app`),
/// both mount the `static` named volume (portcullis read-only), and the certificates live in a named
/// volume that takes its owner from the image. Podman has no compose here, so the flags are spelled out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs podman and the images: run scripts/test.sh"]
async fn the_compose_shape_shares_the_app_network_namespace_and_the_static_volume() {
    let image = image();
    let app_image = "localhost/portcullis-test-app:bookworm";
    assert!(
        podman(&["image", "exists", app_image]).status.success(),
        "{app_image} is missing: run scripts/image.sh"
    );
    let suffix = format!("{}-{}", std::process::id(), rand_suffix());
    let (static_volume, certs_volume) = (format!("static-{suffix}"), format!("certs-{suffix}"));
    let _volumes = Volumes(vec![static_volume.clone(), certs_volume.clone()]);
    for volume in [&static_volume, &certs_volume] {
        assert!(podman(&["volume", "create", volume]).status.success());
    }
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        config_dir.path(),
        "[server]\nhttps = \"0.0.0.0:443\"\nhttp = \"0.0.0.0:80\"\ndomains = [\"localhost\"]\n\
         [tls]\nsource = \"local\"\ndir = \"/certs\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n\
         [[static]]\nurl = \"/static/\"\ndir = \"/srv/static\"\n",
    );
    let app_name = format!("app-{suffix}");
    let app = run_detached(&[
        "--name",
        &app_name,
        "--network",
        "none",
        "--volume",
        &format!("{static_volume}:/srv/static"),
        app_image,
        "python3",
        "-c",
        APP,
    ]);
    // The volume must hold the collected files before portcullis starts (it checks the folder).
    wait_for(
        "the app collected its static files",
        LIMIT,
        || async {
            let out = podman(&["exec", &app.0, "test", "-f", "/srv/static/css/app.css"]);
            out.status.success().then_some(())
        },
        || app.logs(),
    )
    .await;
    let sidecar = run_detached(&[
        "--network",
        &format!("container:{app_name}"),
        "--volume",
        &format!("{}:/etc/portcullis/portcullis.toml:ro", config.display()),
        "--volume",
        &format!("{certs_volume}:/certs"),
        "--volume",
        &format!("{static_volume}:/srv/static:ro"),
        &image,
    ]);
    sidecar.wait_for_log("portcullis is serving").await;
    // The certs volume took its owner from the image (only portcullis mounts it, as in the compose
    // file), so uid 10001 could create the CA there. The client trusts that root, carried across.
    let root = config_dir.path().join("root.crt");
    let copied = podman(&[
        "cp",
        &format!("{}:/certs/local/root.crt", sidecar.0),
        &root.display().to_string(),
    ]);
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let copied = podman(&[
        "cp",
        &root.display().to_string(),
        &format!("{}:/tmp/root.crt", app.0),
    ]);
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );

    let out = podman(&["exec", &app.0, "python3", "-c", CLIENT]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar.logs()
    );
    let seen: serde_json::Value = serde_json::from_str(&text).expect("client JSON");
    let stylesheet = &seen["/static/css/app.css"];
    assert_eq!(stylesheet["status"], 200, "{seen}");
    assert_eq!(stylesheet["body"], "body { color: #123; }\n");
    let app_view = &seen["/whoami/"];
    assert_eq!(app_view["status"], 200, "{seen}");
    let told: serde_json::Value =
        serde_json::from_str(app_view["body"].as_str().unwrap_or("{}")).expect("app JSON");
    assert_eq!(told["proto"], "https");
    assert_eq!(told["host"], "localhost");
    assert_eq!(
        told["peer"], "127.0.0.1",
        "Gunicorn's default --forwarded-allow-ips fits"
    );
    assert!(
        app_view["hsts"]
            .as_str()
            .is_some_and(|h| h.starts_with("max-age="))
    );
    assert_eq!(seen["redirect"]["status"], 308);
    assert_eq!(seen["redirect"]["location"], "https://localhost/admin/");
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_007)
        .unwrap_or(0)
}

/// Named volumes removed when the test ends.
struct Volumes(Vec<String>);

impl Drop for Volumes {
    fn drop(&mut self) {
        for volume in &self.0 {
            let _ = podman(&["volume", "rm", "--force", volume]);
        }
    }
}

/// `podman run --detach` with the ulimits podman needs here and these flags.
fn run_detached(args: &[&str]) -> Container {
    let mut run = vec![
        "run",
        "--detach",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ];
    run.extend_from_slice(args);
    let out = podman(&run);
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Container(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
