//! Several replicas sharing one real `redis-server` (`[storage] backend = "redis"`): a client's login
//! budget holds across all of them, an outage of Redis costs no request (each replica counts on its own
//! meanwhile, and says so in its metrics), and sharing resumes by itself when Redis is back. Needs
//! Debian's `redis-server`: run with `--include-ignored` (scripts/test.sh installs it).

mod common;

use std::net::IpAddr;
use std::process::{Command, Stdio};

use common::*;
use http::StatusCode;

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
