//! Several replicas sharing one real `redis-server` (`[storage] backend = "redis"`): a client's login
//! budget holds across all of them, an outage of Redis costs no request (each replica counts on its own
//! meanwhile, and says so in its metrics), and sharing resumes by itself when Redis is back. Needs
//! Debian's `redis-server`: run with `--include-ignored` (scripts/test.sh installs it).

mod common;

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;

/// A throw-away Redis on a loopback port: no persistence, stopped by its PID when dropped.
struct Redis {
    port: u16,
    password: Option<String>,
    process: Option<KillOnDrop>,
}

impl Redis {
    async fn start() -> Redis {
        Redis::start_with(None).await
    }

    async fn start_with(password: Option<&str>) -> Redis {
        let mut redis = Redis {
            port: fixed_port(),
            password: password.map(str::to_string),
            process: None,
        };
        redis.restart().await;
        redis
    }

    /// Starts it again on the same port (after `stop`), as an operator's restart does.
    async fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.process = Some(KillOnDrop(child));
        let port = self.port;
        eventually("redis-server listens", || {
            std::future::ready(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })
        .await;
    }

    fn stop(&mut self) {
        self.process = None;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

fn replica_config(redis: &Redis, prefix: &str) -> String {
    format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [storage]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n\
         [[rate_limit]]\npath = \"/admin/login/\"\nrequests = 3\nper = \"1h\"\n",
        redis.url()
    )
}

/// One login POST from `client` to `replica`, on a connection of its own (HTTP/1.1 closes after a 429).
async fn login_post(replica: &Proxy, client: IpAddr) -> StatusCode {
    let mut connection = Client::connect_from(
        Some(client),
        replica.https,
        "localhost",
        &replica.root,
        &[b"h2"],
    )
    .await
    .expect("connect");
    let req = request("POST", "/admin/login/", replica.https.port())
        .body(full("username=admin&password=guess"))
        .expect("request");
    connection.fetch(req).await.0.status()
}

fn gauge(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&format!("portcullis_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no portcullis_{name} in\n{scrape}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: run scripts/test.sh"]
async fn login_budgets_hold_across_replicas_and_survive_a_redis_outage() {
    let mut redis = Redis::start().await;
    let upstream = Upstream::start().await;
    let prefix = format!("test-{}:", std::process::id());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let proxy = Proxy::start(
            &format!("http://{}", upstream.addr),
            &replica_config(&redis, &prefix),
        )
        .await;
        replicas.push(proxy);
    }
    let scrape = |i: usize| {
        let addr = replicas[i].server().metrics_addr.expect("metrics");
        async move { scrape_metrics(addr).await }
    };

    // Three guesses, one per replica, spend the client's budget on all of them.
    let attacker: IpAddr = [127, 0, 0, 1].into();
    for replica in &replicas {
        assert_eq!(login_post(replica, attacker).await, StatusCode::OK);
    }
    for replica in &replicas {
        assert_eq!(
            login_post(replica, attacker).await,
            StatusCode::TOO_MANY_REQUESTS,
            "the fourth guess, on any replica"
        );
    }
    assert_eq!(upstream.count(), 3);
    // Another client has its own budget.
    assert_eq!(
        login_post(&replicas[1], [127, 0, 0, 2].into()).await,
        StatusCode::OK
    );
    assert_eq!(gauge(&scrape(0).await, "store_up"), 1.0);

    // Redis goes away: requests keep being served, each replica counting on its own.
    redis.stop();
    let during: IpAddr = [127, 0, 0, 3].into();
    for replica in &replicas {
        assert_eq!(
            login_post(replica, during).await,
            StatusCode::OK,
            "an outage costs no request"
        );
    }
    let scrape0 = scrape(0).await;
    assert_eq!(gauge(&scrape0, "store_up"), 0.0, "{scrape0}");
    assert!(gauge(&scrape0, "store_failures_total") >= 1.0);
    assert!(gauge(&scrape0, "rate_limit_local_total") >= 1.0);
    // The local budgets still stop a brute force on one replica.
    for _ in 0..2 {
        assert_eq!(login_post(&replicas[0], during).await, StatusCode::OK);
    }
    assert_eq!(
        login_post(&replicas[0], during).await,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Redis is back (empty: it kept nothing): each replica shares again by itself, no restart.
    redis.restart().await;
    let mut next_client = 10u8;
    for replica in &replicas {
        wait_for(
            "the replica uses redis again",
            LIMIT,
            || {
                next_client += 1;
                let client: IpAddr = [127, 0, 1, next_client].into();
                async move {
                    login_post(replica, client).await;
                    let up = gauge(
                        &scrape_metrics(replica.server().metrics_addr.expect("metrics")).await,
                        "store_up",
                    );
                    (up == 1.0).then_some(())
                }
            },
            || "store_up stayed 0".to_string(),
        )
        .await;
    }
    let after: IpAddr = [127, 0, 2, 1].into();
    for replica in &replicas {
        assert_eq!(login_post(replica, after).await, StatusCode::OK);
    }
    for replica in &replicas {
        assert_eq!(
            login_post(replica, after).await,
            StatusCode::TOO_MANY_REQUESTS,
            "shared again"
        );
    }
    for replica in replicas {
        replica.stop().await;
    }
}

/// `portcullis check --connect` against the real server: the password from the variable
/// `password_env` names (never the file), what it found there, and a clear failure for a wrong
/// password, a missing variable and a server that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: run scripts/test.sh"]
async fn check_connect_reaches_redis_with_the_password_from_the_environment() {
    let mut redis = Redis::start_with(Some("correct-horse")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndomains = [\"localhost\"]\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n\
             [storage]\nbackend = \"redis\"\nurl = \"{}\"\npassword_env = \"REDIS_PASSWORD\"\n",
            redis.url()
        ),
    )
    .expect("write");
    let check = |password: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command
            .args(["check", "--connect", "--config"])
            .arg(&config);
        command.env_remove("REDIS_PASSWORD");
        if let Some(password) = password {
            command.env("REDIS_PASSWORD", password);
        }
        let out = command.output().expect("run portcullis");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = check(Some("correct-horse"));
    assert!(ok, "{text}");
    assert!(
        text.contains("store:    redis 7") && text.contains("reachable, 0 keys under portcullis:"),
        "{text}"
    );
    assert!(
        !text.contains("correct-horse"),
        "the password is never printed: {text}"
    );
    let (ok, text) = check(Some("wrong"));
    assert!(!ok && text.contains("`storage.url`"), "{text}");
    let (ok, text) = check(None);
    assert!(
        !ok && text.contains("`storage.password_env`") && text.contains("REDIS_PASSWORD"),
        "{text}"
    );
    redis.stop();
    let (ok, text) = check(Some("correct-horse"));
    assert!(!ok && text.contains("`storage.url`"), "{text}");
}

/// The local CA shared: three replicas started at once on one Redis, each with its own `tls.dir`,
/// agree on one root (the first stored wins, the others take it), so a client that trusts one replica's
/// root is served by all of them; a replica restarted later takes the same root again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: run scripts/test.sh"]
async fn replicas_serve_one_local_ca_through_redis() {
    let redis = Redis::start().await;
    let upstream = Upstream::start().await;
    let prefix = format!("ca-{}:", std::process::id());
    let config = format!(
        "[storage]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n",
        redis.url()
    );
    let upstream_url = format!("http://{}", upstream.addr);
    let (a, b, c) = tokio::join!(
        Proxy::start(&upstream_url, &config),
        Proxy::start(&upstream_url, &config),
        Proxy::start(&upstream_url, &config),
    );
    let roots: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|p| std::fs::read_to_string(&p.root).expect("root"))
        .collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "one root for all");
    // A client trusting the first replica's root is served by every replica.
    for replica in [&a, &b, &c] {
        let mut client = Client::connect(replica.https, "localhost", &a.root, &[b"h2"])
            .await
            .expect("the shared root verifies every replica");
        let (response, _) = client.get("/", replica.https.port()).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    // A fourth replica, later, with a CA of its own already in its folder, takes the shared one.
    let mut late = Proxy::start(&upstream_url, "").await;
    let own = std::fs::read_to_string(&late.root).expect("root");
    assert_ne!(own, roots[0]);
    let first_run = late.server.take().expect("running");
    first_run.shutdown();
    tokio::time::timeout(LIMIT, first_run.wait())
        .await
        .expect("stops in time");
    // `late` keeps its folder, with its own CA in it.
    let dir = late.dir.path().to_path_buf();
    assert!(dir.join("local/root.key").exists());
    let text = format!(
        "[server]\nhttps = \"127.0.0.1:0\"\ndomains = [\"localhost\"]\n[tls]\nsource = \"local\"\ndir = \"{}\"\n\
         [upstream]\nurl = \"{upstream_url}\"\n{config}",
        dir.display()
    );
    let restarted = portcullis::server::start(
        portcullis::config::Config::parse(&text, "test", None).expect("config"),
    )
    .await
    .expect("starts");
    let root = restarted.local_ca_root.clone().expect("root");
    assert_eq!(std::fs::read_to_string(root).expect("root"), roots[0]);
    restarted.shutdown();
    for replica in [a, b, c] {
        replica.stop().await;
    }
}

/// A Redis that accepts connections and never answers (a hung server, a black-holed network): login
/// POSTs are still served, each replica deciding alone, and the metrics say the store is down. Needs no
/// redis-server: the black hole is a listener of the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_answers_costs_no_request() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hole_addr = hole.local_addr().expect("addr");
    let swallow = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let (upstream, proxy) = Proxy::with_upstream(&format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\nbackend = \"redis\"\nurl = \"redis://{hole_addr}/0\"\n\
         [[rate_limit]]\npath = \"/admin/login/\"\nrequests = 2\nper = \"1h\"\n"
    ))
    .await;
    let client: IpAddr = [127, 0, 0, 1].into();
    for _ in 0..2 {
        assert_eq!(login_post(&proxy, client).await, StatusCode::OK);
    }
    // The local budget still holds while the store cannot answer.
    assert_eq!(
        login_post(&proxy, client).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(upstream.count(), 2);
    let scrape = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
    assert_eq!(gauge(&scrape, "store_up"), 0.0, "{scrape}");
    assert!(gauge(&scrape, "rate_limit_local_total") >= 3.0, "{scrape}");
    swallow.abort();
    proxy.stop().await;
}

/// Three `portcullis` processes ordering from pebble through one Redis.
struct AcmeReplicas {
    redis: Redis,
    pebble: common::pebble::Pebble,
    _upstream: Upstream,
    dirs: Vec<tempfile::TempDir>,
    https: Vec<u16>,
    metrics: Vec<std::net::SocketAddr>,
    /// `None` once killed.
    processes: Arc<std::sync::Mutex<Vec<Option<KillOnDrop>>>>,
    balancer: Balancer,
    root: std::path::PathBuf,
}

/// The TCP balancer in front of the replicas that pebble validates through (it dials one port per
/// challenge type): each connection goes to a replica that does not hold the order lease, read from
/// the replicas' metrics as the connection arrives. So every validation is answered by a sibling of the
/// replica that ordered. With `kill_holder`, the first validation instead SIGKILLs the holder and is
/// dropped: the order dies with its replica.
struct Balancer {
    /// (replica the connection went to, replica holding the lease)
    routed: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
    killed: Arc<std::sync::Mutex<Option<usize>>>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn lease_holders(metrics: &[std::net::SocketAddr]) -> Vec<Option<bool>> {
    let mut holders = Vec::new();
    for addr in metrics {
        let scrape = tokio::time::timeout(LIMIT, async {
            let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            drop(stream);
            Some(scrape_metrics(*addr).await)
        })
        .await
        .ok()
        .flatten();
        holders.push(scrape.map(|s| gauge(&s, "acme_lock_held") == 1.0));
    }
    holders
}

impl Balancer {
    fn start(
        fronts: Vec<(std::net::TcpListener, Vec<u16>)>,
        metrics: Vec<std::net::SocketAddr>,
        processes: Arc<std::sync::Mutex<Vec<Option<KillOnDrop>>>>,
        kill_holder: bool,
    ) -> Balancer {
        let routed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let killed = Arc::new(std::sync::Mutex::new(None));
        let kill_pending = Arc::new(AtomicBool::new(kill_holder));
        let mut tasks = Vec::new();
        for (listener, targets) in fronts {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let (routed, killed, kill_pending, metrics, processes) = (
                routed.clone(),
                killed.clone(),
                kill_pending.clone(),
                metrics.clone(),
                processes.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let holders = lease_holders(&metrics).await;
                    let Some(holder) = holders.iter().position(|h| *h == Some(true)) else {
                        continue; // no order in progress: not a validation of ours
                    };
                    if kill_pending.swap(false, Ordering::SeqCst) {
                        processes.lock().expect("processes")[holder] = None;
                        *killed.lock().expect("killed") = Some(holder);
                        continue;
                    }
                    let Some(to) = holders.iter().position(|h| *h == Some(false)) else {
                        continue;
                    };
                    routed.lock().expect("routed").push((to, holder));
                    let target = targets[to];
                    tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                        {
                            let _ = tokio::time::timeout(
                                LIMIT,
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound),
                            )
                            .await;
                        }
                    });
                }
            }));
        }
        Balancer {
            routed,
            killed,
            _tasks: tasks,
        }
    }
}

impl AcmeReplicas {
    async fn start(challenge: &str, validity_secs: u64, kill_holder: bool) -> AcmeReplicas {
        let redis = Redis::start().await;
        let upstream = Upstream::start().await;
        let (tls_front, http_front) = (fixed_port(), fixed_port());
        let pebble =
            common::pebble::Pebble::start(http_front, tls_front, validity_secs, false).await;
        let prefix = format!("acme-{}:", std::process::id());
        let (mut dirs, mut https, mut http, mut metrics, mut processes) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (h, p, m) = (fixed_port(), fixed_port(), fixed_port());
            let config = format!(
                "[server]\nhttps = \"127.0.0.1:{h}\"\nhttp = \"127.0.0.1:{p}\"\ndomains = [\"{}\"]\nshutdown_grace = \"1s\"\n\
                 [tls]\nsource = \"acme\"\ndir = \"{}\"\n\
                 [acme]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\nchallenge = \"{challenge}\"\n\
                 retry_base_delay = \"1s\"\nretry_max_delay = \"4s\"\nrenew_check_interval = \"1s\"\n\
                 [storage]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\nencryption_key_env = \"PORTCULLIS_STORAGE_KEY\"\n\
                 [upstream]\nurl = \"http://{}\"\n[metrics]\nlisten = \"127.0.0.1:{m}\"\n",
                common::pebble::DOMAIN,
                dir.path().join("state").display(),
                pebble.directory_url,
                pebble.ca().display(),
                redis.url(),
                upstream.addr,
            );
            std::fs::write(dir.path().join("portcullis.toml"), config).expect("write config");
            processes.push(Some(spawn_replica(dir.path())));
            dirs.push(dir);
            https.push(h);
            http.push(p);
            metrics.push(std::net::SocketAddr::from(([127, 0, 0, 1], m)));
        }
        let processes = Arc::new(std::sync::Mutex::new(processes));
        let bind = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let balancer = Balancer::start(
            vec![(bind(tls_front), https.clone()), (bind(http_front), http)],
            metrics.clone(),
            processes.clone(),
            kill_holder,
        );
        let root = pebble.issuing_root(dirs[0].path()).await;
        AcmeReplicas {
            redis,
            pebble,
            _upstream: upstream,
            dirs,
            https,
            metrics,
            processes,
            balancer,
            root,
        }
    }

    /// Stops every replica and starts it again; `forget` empties its `tls.dir` first, so what it
    /// serves can only come from Redis.
    fn restart_all(&self, forget: bool) {
        let mut processes = self.processes.lock().expect("processes");
        for (i, dir) in self.dirs.iter().enumerate() {
            processes[i] = None;
            if forget {
                let _ = std::fs::remove_dir_all(dir.path().join("state"));
            }
            processes[i] = Some(spawn_replica(dir.path()));
        }
    }

    fn alive(&self) -> Vec<usize> {
        let processes = self.processes.lock().expect("processes");
        (0..processes.len())
            .filter(|&i| processes[i].is_some())
            .collect()
    }

    fn logs(&self) -> String {
        let mut out = format!("pebble:\n{}\n", self.pebble.log());
        for (i, dir) in self.dirs.iter().enumerate() {
            let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
            out.push_str(&format!("--- replica {i}:\n{log}\n"));
        }
        out
    }

    /// The leaf every live replica serves, once they all serve the same one and it is not `not`.
    async fn one_leaf_everywhere(&self, not: Option<&[u8]>, within: Duration) -> Vec<u8> {
        wait_for(
            "every live replica serves one certificate from pebble",
            within,
            || async {
                let mut leaves = Vec::new();
                for i in self.alive() {
                    leaves.push(
                        common::pebble::served_leaf(self.https[i], &self.root)
                            .await
                            .ok()?,
                    );
                }
                let first = leaves.first()?.clone();
                (leaves.iter().all(|l| *l == first) && Some(&first[..]) != not).then_some(first)
            },
            || self.logs(),
        )
        .await
    }

    async fn sum(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for i in self.alive() {
            total += gauge(&scrape_metrics(self.metrics[i]).await, name);
        }
        total
    }
}

/// Starts the replica whose `portcullis.toml` is in `dir`, appending to its log there.
fn spawn_replica(dir: &std::path::Path) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--config"])
        .arg(dir.join("portcullis.toml"))
        .env("PORTCULLIS_STORAGE_KEY", STORAGE_KEY)
        .env("RUST_LOG", "portcullis=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start portcullis");
    KillOnDrop(child)
}

/// Requests to every replica in turn, each on a new TLS connection verified against the CA's root (so
/// each sees the certificate served at that moment), until `finish`.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl SteadyLoad {
    fn start(https: &[u16], root: &std::path::Path) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let (ports, root, stopped) = (https.to_vec(), root.to_path_buf(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut served, mut failed) = (0, Vec::new());
            while !stopped.load(Ordering::SeqCst) {
                for &port in &ports {
                    match steady_get(port, &root).await {
                        Ok(StatusCode::OK) => served += 1,
                        Ok(status) => failed.push(format!("replica on {port}: {status}")),
                        Err(error) => failed.push(format!("replica on {port}: {error}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (served, failed)
        });
        SteadyLoad { stop, task }
    }

    /// How many requests were answered 200, once it has checked that none failed.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (served, failed) = self.task.await.expect("load task");
        assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
        served
    }
}

async fn steady_get(port: u16, root: &std::path::Path) -> std::io::Result<StatusCode> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let host = format!("{}:{port}", common::pebble::DOMAIN);
    let attempt = async {
        let mut client = Client::connect(addr, common::pebble::DOMAIN, root, &[b"h2"]).await?;
        let req = http::Request::builder()
            .uri(format!("https://{host}/"))
            .header("host", &host)
            .body(full(""))
            .map_err(std::io::Error::other)?;
        let response = client.send(req).await.map_err(std::io::Error::other)?;
        let status = response.status();
        // The whole body, so a response cut off by a certificate swap counts as failed.
        response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?;
        Ok(status)
    };
    tokio::time::timeout(LIMIT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no answer in time")))
}

/// `openssl rand -base64 32`, for the replicas' `storage.encryption_key_env`.
const STORAGE_KEY: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";

/// Needs redis-server and pebble. Three replicas start with nothing: one places the order (one order
/// in all), the CA's TLS-ALPN-01 validation is answered by another replica from what the orderer put
/// in Redis, and all three serve the certificate. A Redis outage costs no handshake; once Redis is
/// back (empty: it keeps nothing on disk here) the replicas put the certificate back, and the renewal
/// one of them orders is seen and served by all three, still with one order per certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and pebble: run scripts/test.sh"]
async fn replicas_order_once_answer_each_others_challenges_and_all_serve_the_renewal() {
    // 45-second certificates: the renewal is due about 30 seconds after issue, after the outage.
    let mut replicas = AcmeReplicas::start("tls-alpn-01", 45, false).await;
    let first = replicas
        .one_leaf_everywhere(None, Duration::from_secs(60))
        .await;
    assert_eq!(
        replicas.sum("acme_orders_total").await,
        1.0,
        "one order in all"
    );
    {
        let routed = replicas.balancer.routed.lock().expect("routed");
        assert!(!routed.is_empty(), "the CA validated through the balancer");
        assert!(routed.iter().all(|(to, holder)| to != holder), "{routed:?}");
    }
    // The key in Redis is sealed: no PEM private key in the clear.
    let dump = Command::new("redis-cli")
        .args([
            "-p",
            &replicas.redis.port.to_string(),
            "--no-raw",
            "KEYS",
            "*",
        ])
        .output()
        .expect("redis-cli");
    let keys = String::from_utf8_lossy(&dump.stdout).to_string();
    assert!(keys.contains(":cert:portcullis.test"), "{keys}");
    let cert_key = keys
        .lines()
        .find(|l| l.contains(":cert:"))
        .and_then(|l| l.split('"').nth(1))
        .expect("cert key")
        .to_string();
    let value = Command::new("redis-cli")
        .args(["-p", &replicas.redis.port.to_string(), "GET", &cert_key])
        .output()
        .expect("redis-cli");
    let value = String::from_utf8_lossy(&value.stdout).to_string();
    assert!(value.starts_with("portcullis-sealed-v1:"), "{value:.80}");
    assert!(!value.contains("PRIVATE KEY"));
    // `check --connect` finds the certificate and tells whether this replica's key opens it.
    let check = |key: &str| {
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check", "--connect", "--config"])
            .arg(replicas.dirs[0].path().join("portcullis.toml"))
            .env("PORTCULLIS_STORAGE_KEY", key)
            .output()
            .expect("check")
    };
    let ours = check(STORAGE_KEY);
    let said = String::from_utf8_lossy(&ours.stdout).to_string();
    assert!(ours.status.success(), "{said}");
    assert!(
        said.contains("1 account(s), 1 certificate(s)")
            && said.contains("sealed, and they open with this key"),
        "{said}"
    );
    let other = check("AAAAEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=");
    let said = String::from_utf8_lossy(&other.stderr).to_string();
    assert!(
        !other.status.success() && said.contains("does not open with this encryption key"),
        "{said}"
    );

    // Steady requests to all three from here to the end: neither the outage nor the swap fails one.
    let load = SteadyLoad::start(&replicas.https, &replicas.root);
    // Redis goes away for 20 s: every replica keeps serving, and says the store is down.
    replicas.redis.stop();
    let outage = std::time::Instant::now();
    for i in replicas.alive() {
        eventually("the replica reports the store down", || async {
            gauge(&scrape_metrics(replicas.metrics[i]).await, "store_up") == 0.0
        })
        .await;
        assert_eq!(
            common::pebble::served_leaf(replicas.https[i], &replicas.root)
                .await
                .expect("handshakes go on"),
            first
        );
    }
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed())).await;
    let logs = replicas.logs();
    assert!(
        logs.contains("redis is unreachable"),
        "the outage is logged:\n{logs}"
    );
    replicas.redis.restart().await;
    for i in replicas.alive() {
        eventually("the replica reports the store back", || async {
            gauge(&scrape_metrics(replicas.metrics[i]).await, "store_up") == 1.0
        })
        .await;
    }

    let renewed = replicas
        .one_leaf_everywhere(Some(&first), Duration::from_secs(60))
        .await;
    assert_ne!(renewed, first);
    assert_eq!(
        replicas.sum("acme_orders_total").await,
        2.0,
        "one order per certificate: {}",
        replicas.logs()
    );
    assert!(replicas.sum("acme_certificates_loaded_total").await >= 4.0);
    assert!(load.finish().await > 0);
}

/// Needs redis-server and pebble. The replica that holds the order lease is SIGKILLed the moment the
/// CA comes to validate (HTTP-01): its lease lapses, one of the other two takes the order over and the
/// other answers the CA from Redis, and both serve the one certificate that results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and pebble: run scripts/test.sh"]
async fn a_replica_killed_mid_order_hands_the_order_to_another() {
    let replicas = AcmeReplicas::start("http-01", 3600, true).await;
    let leaf = replicas
        .one_leaf_everywhere(None, Duration::from_secs(90))
        .await;
    let killed = replicas
        .balancer
        .killed
        .lock()
        .expect("killed")
        .expect("the holder was killed");
    assert!(!replicas.alive().contains(&killed));
    assert_eq!(replicas.alive().len(), 2);
    assert!(!leaf.is_empty());
    // The survivors placed one order between them; the validation went to the one not ordering.
    assert_eq!(
        replicas.sum("acme_orders_total").await,
        1.0,
        "{}",
        replicas.logs()
    );
    let routed = replicas.balancer.routed.lock().expect("routed").clone();
    assert!(
        !routed.is_empty()
            && routed
                .iter()
                .all(|(to, holder)| to != holder && *holder != killed),
        "{routed:?}"
    );

    // All three restarted, their tls.dir emptied: the certificate comes from Redis, no new order.
    replicas.restart_all(true);
    let after = replicas
        .one_leaf_everywhere(None, Duration::from_secs(60))
        .await;
    assert_eq!(after, leaf, "the same certificate");
    assert_eq!(replicas.alive().len(), 3);
    assert_eq!(
        replicas.sum("acme_orders_total").await,
        0.0,
        "{}",
        replicas.logs()
    );
    assert!(replicas.sum("acme_certificates_loaded_total").await >= 3.0);
}
