//! A bounded random run of the fuzz properties on every `cargo test`: seed inputs, then a fixed number of
//! random mutations of them per target, from a printed seed (`PORTCULLIS_FUZZ_SEED` replays one), so a
//! run covers the same inputs on any machine. The same properties run for longer under libFuzzer in
//! `fuzz/`.

use portcullis::fuzzing;

/// Mutated inputs per target (the config target parses TOML, so it gets fewer).
const CASES: u64 = 20_000;

/// xorshift64*: deterministic, so a failure reproduces with the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b";",
    b"=",
    b",",
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\0",
    b":",
    b"[",
    b"]",
    b"@",
    b"/",
    b"%",
    b"\xff",
    b"Secure",
    b"HttpOnly",
    b"SameSite=None",
    b"csrftoken",
    b"Expires=Wed, 21 Oct 2026 07:28:00 GMT",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(4) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            1 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(data.len() + 1);
                data.splice(at..at, token.iter().copied());
            }
            2 if !data.is_empty() => {
                let at = rng.below(data.len());
                let len = rng.below(data.len() - at + 1);
                data.drain(at..at + len);
            }
            _ => {
                let extra: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                data.extend(extra);
            }
        }
    }
    data
}

fn run(name: &str, seeds: &[&[u8]], property: fn(&[u8])) {
    run_cases(name, seeds, property, CASES);
}

fn run_cases(name: &str, seeds: &[&[u8]], property: fn(&[u8]), cases: u64) {
    let seed = std::env::var("PORTCULLIS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0000_0000_0001 ^ name.len() as u64);
    println!("{name}: {cases} inputs from seed {seed} (PORTCULLIS_FUZZ_SEED={seed} replays them)");
    let mut rng = Rng(seed);
    for seed in seeds {
        property(seed);
    }
    for case in 0..cases {
        let seed = seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed);
        let outcome = std::panic::catch_unwind(|| property(&input));
        assert!(
            outcome.is_ok(),
            "{name}: property failed for input {case} {:?}",
            String::from_utf8_lossy(&input)
        );
    }
}

#[test]
fn set_cookie_rewrite() {
    run(
        "set_cookie",
        &[
            b"sessionid=abc; Path=/",
            b"csrftoken=x; expires=Wed, 21 Oct 2026 07:28:00 GMT; Max-Age=31449600; Path=/; SameSite=Lax",
            b"a=b; secure; HTTPONLY; samesite=strict",
            b"a=b; SameSite=None",
            b"a=b; Path=/;  ;",
            b"",
        ],
        fuzzing::set_cookie,
    );
}

#[test]
fn forwarded_and_hop_by_hop_rewrite() {
    run(
        "request_headers",
        &[
            b"connection:keep-alive, x-a\nx-a:1\nx-forwarded-for:6.6.6.6\nx-forwarded-proto:http",
            b"te:trailers\nupgrade:h2c\nforwarded:for=1.2.3.4\nx-forwarded-ssl:on\nhost:example.com",
            b"connection:host, x-forwarded-for\nx-forwarded-host:evil",
        ],
        fuzzing::request_headers,
    );
}

#[test]
fn host_check_and_redirect() {
    run(
        "host_and_redirect",
        &[
            b"example.com\n/a?b=c",
            b"EXAMPLE.com:8080\n//evil.com",
            b"[::1]:80\n/",
            b"evil.com\n/",
            b"example.com.\n/x",
        ],
        fuzzing::host_and_redirect,
    );
}

#[test]
fn path_normalisation() {
    run(
        "path_normalisation",
        &[
            b"admin/login/",
            b"admin/%6Cogin/",
            b"%61dmin//login%2F",
            b"static/../admin/./login/",
            b"caf\xc3\xa9/x",
            b"a%252Fb",
        ],
        fuzzing::path_normalisation,
    );
}

#[test]
fn config_parsing() {
    run_cases(
        "config",
        &[
            include_bytes!("../config/production.example.toml"),
            include_bytes!("../config/portcullis.toml"),
            b"[server]\ndomains = [\"a.example\"]\n[upstream]\nurl = \"unix:/run/g.sock\"\n[limits]\nmax_body = \"2.5MB\"\n",
        ],
        fuzzing::config,
        2_000,
    );
}

#[test]
fn proxy_protocol_header() {
    run(
        "proxy_header",
        &[
            b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 443\r\nGET / HTTP/1.1\r\n",
            b"PROXY TCP6 2001:db8::7 ::1 5 443\r\n",
            b"PROXY UNKNOWN\r\n\x16\x03\x01",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00\x00\x02\x7f\x00\x00\x01\x9c\x40\x01\xbb\x16",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x27\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x07\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01\x00\x05\x01\xbb\x02\x00\x03a.b",
            b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
            b"GET / HTTP/1.1\r\n",
        ],
        fuzzing::proxy_header,
    );
}
