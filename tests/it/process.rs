//! The real binary, as operators run it: `gateway serve` in a child process
//! with JSON logs, driven by signals. What only a process of its own can
//! show: the log lines it writes (the access log, and that no secret is in
//! any of them) and SIGHUP, neither of which an in-process app can observe
//! without sharing them with the tests running beside it.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::helpers::{
    assert_error, config_toml, eventually, metric, raw_get, raw_request, route, run_cli, served_certificate,
    TestOptions, PASSWORD,
};
use crate::upstream::{echo, spawn_mtls_upstream, spawn_tls_upstream, spawn_upstream};

const EMAIL: &str = "operator@example.com";

/// A `gateway serve` child process and the lines it has logged so far.
struct Process {
    child: Child,
    _dir: TempDir,
    config: PathBuf,
    addr: SocketAddr,
    admin: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// A test that fails before [`Process::stop`] leaves no gateway running.
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Writes the config (`opts`, JSON logs) into a fresh directory, creates
    /// the user [`EMAIL`], starts the binary and waits for it to listen.
    async fn start(opts: &TestOptions) -> Process {
        Self::start_logging(opts, "info").await
    }

    /// [`Process::start`] with `RUST_LOG=level`.
    async fn start_logging(opts: &TestOptions, level: &str) -> Process {
        Self::start_with_env(opts, level, &[]).await
    }

    /// [`Process::start_logging`] with more environment variables.
    async fn start_with_env(opts: &TestOptions, level: &str, env: &[(&str, &Path)]) -> Process {
        let dir = tempfile::tempdir().expect("create temp dir");
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, process_config(opts, "")).expect("write gateway.toml");
        let args = ["user", "create", "--tenant", "default", "--email", EMAIL, "--password-stdin"];
        run_cli(&config, &args, &format!("{PASSWORD}\n")).await.expect("user create");

        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .current_dir(dir.path())
            .env("RUST_LOG", level)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lines lock").push(line);
            }
        });
        let mut process = Process {
            child,
            _dir: dir,
            config,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            lines,
            reader: Some(reader),
        };
        let listening =
            process.wait_for_log("the gateway to listen", |l| l["fields"]["message"] == "gateway listening").await;
        let field = |name: &str| -> SocketAddr {
            let text = listening["fields"][name].as_str().unwrap_or_else(|| panic!("no {name} address in {listening}"));
            text.parse().unwrap_or_else(|e| panic!("{name} address {text:?}: {e}"))
        };
        process.addr = field("public");
        process.admin = field("admin");
        process
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The log lines so far, parsed (a line that is not JSON fails the test).
    fn logs(&self) -> Vec<Value> {
        let lines = self.lines.lock().expect("log lines lock");
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits (10 s at most) for a log line matching `pred` and returns it.
    async fn wait_for_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            if let Some(line) = self.logs().into_iter().find(&pred) {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no log line for {what} within 10 s; logged:\n{}",
            self.lines.lock().expect("log lines lock").join("\n")
        );
    }

    fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The process's peak resident set size in bytes (`VmHWM`).
    fn peak_rss(&self) -> usize {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {path}:\n{status}"));
        kib * 1024
    }

    /// Resets the peak resident set size to the current one (Linux ≥ 4.0)
    /// and returns it.
    fn reset_peak_rss(&self) -> usize {
        let path = format!("/proc/{}/clear_refs", self.child.id());
        std::fs::write(&path, "5").unwrap_or_else(|e| panic!("write {path}: {e}"));
        self.peak_rss()
    }

    async fn metrics(&self) -> String {
        let resp = reqwest::get(format!("http://{}/metrics", self.admin)).await.expect("GET /metrics");
        resp.text().await.expect("metrics body")
    }

    /// SIGTERM, then waits for the exit (15 s at most) and the last lines;
    /// returns everything logged, unparsed.
    async fn stop(mut self) -> String {
        self.signal("TERM");
        let mut status = None;
        for _ in 0..300 {
            status = self.child.try_wait().expect("poll the child");
            if status.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(status.is_some_and(|s| s.success()), "the gateway did not exit cleanly on SIGTERM: {status:?}");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the log reader ended");
        }
        let lines = self.lines.lock().expect("log lines lock");
        lines.join("\n")
    }
}

/// The test config with JSON logs, plus `extra` tables (routes).
fn process_config(opts: &TestOptions, extra: &str) -> String {
    format!("{}\n[log]\nformat = \"json\"\n{extra}", config_toml(opts))
}

/// The access lines logged so far.
fn access_lines(logs: &[Value]) -> Vec<Value> {
    logs.iter().filter(|l| l["target"] == "gateway::access").map(|l| l["fields"].clone()).collect()
}

async fn login(client: &Client, p: &Process) -> Value {
    let resp = client
        .post(p.url("/auth/login"))
        .json(&json!({"email": EMAIL, "password": PASSWORD}))
        .send()
        .await
        .expect("POST /auth/login");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.expect("login JSON")
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    let value = resp.headers().get(name).unwrap_or_else(|| panic!("no {name} on the response"));
    value.to_str().expect("ASCII header").to_owned()
}

#[tokio::test]
async fn the_access_log_has_a_line_per_request_and_no_secret_anywhere_in_the_logs() {
    let svc = spawn_upstream("logged").await;
    let routes =
        [route("private", "/private", &[svc.url()], ""), route("open", "/open", &[svc.url()], "auth = \"public\"")];
    // Forward auth on, for this machine: its decisions are logged too.
    let opts = TestOptions {
        server_extra: "trusted_proxies = [\"127.0.0.1/32\"]".to_owned(),
        ..TestOptions::with_extra(format!("{}\n[forward_auth]\nenabled = true\n", routes.concat()))
    };
    // At debug level, so that "no secret" covers what an operator can turn on.
    let p = Process::start_logging(&opts, "debug").await;
    let client = Client::new();
    let tokens = login(&client, &p).await;
    let access = tokens["access_token"].as_str().expect("access token").to_owned();
    let refresh = tokens["refresh_token"].as_str().expect("refresh token").to_owned();

    // A proxied request with a token, and a token in the query as well.
    let resp = client
        .get(p.url(&format!("/private/x?access_token={access}&page=2")))
        .bearer_auth(&access)
        .send()
        .await
        .expect("GET /private/x");
    let ok_id = header(&resp, "x-request-id");
    let user_id = echo(resp).await.one("x-user-id").to_owned();
    // A forward-auth decision about a request with the token in its query.
    let resp = client
        .get(p.url("/auth/forward-auth"))
        .bearer_auth(&access)
        .header("x-forwarded-method", "GET")
        .header("x-forwarded-host", "gateway.test")
        .header("x-forwarded-uri", format!("/private/z?access_token={access}"))
        .send()
        .await
        .expect("GET /auth/forward-auth");
    assert_eq!(resp.status(), StatusCode::OK);
    let decision_id = header(&resp, "x-request-id");
    // Refused: no token; a refresh token as a bearer; a path that climbs out.
    let resp = client.get(p.url("/private/y")).send().await.expect("GET without a token");
    let missing_id = header(&resp, "x-request-id");
    assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let resp = client.get(p.url("/private/y")).bearer_auth(&refresh).send().await.expect("GET with a refresh token");
    assert_error(resp, StatusCode::UNAUTHORIZED, "invalid_token").await;
    let bad_path = raw_get(p.addr, "/open/..%2f..%2fetc", "gateway.test", &["X-Request-Id: bad-path-1"]).await;
    bad_path.assert_error("climbing path", 400, "invalid_request");
    // A head that cannot be parsed at all.
    let garbage = raw_request(p.addr, b"GET /open/x HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n").await;
    assert_eq!(garbage.status, Some(400), "head: {}", garbage.head);
    // The gateway's own API, with the refresh token in the body.
    let resp = client
        .post(p.url("/auth/refresh"))
        .json(&json!({"refresh_token": refresh}))
        .send()
        .await
        .expect("POST /auth/refresh");
    assert_eq!(resp.status(), StatusCode::OK);
    // The API's answers carry the request id too, as its access line does.
    let api_id = header(&resp, "x-request-id");
    let rotated: Value = resp.json().await.expect("refresh JSON");

    // Each line is written before its answer, but read from the pipe by
    // another thread: wait for all eight.
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = access_lines(&p.logs());
        if lines.len() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let find = |pred: &dyn Fn(&Value) -> bool, what: &str| -> Value {
        let found: Vec<&Value> = lines.iter().filter(|l| pred(l)).collect();
        assert_eq!(found.len(), 1, "one access line for {what}; access lines: {lines:#?}");
        found[0].clone()
    };
    let ok = find(&|l| l["request_id"] == ok_id.as_str(), "the proxied request");
    assert_eq!(ok["route"], "private", "{ok}");
    assert_eq!(ok["method"], "GET", "{ok}");
    assert_eq!(ok["path"], "/private/x", "the path without its query: {ok}");
    assert_eq!(ok["status"], 200, "{ok}");
    assert_eq!(ok["user_id"], user_id.as_str(), "{ok}");
    assert_eq!(ok["upstream"], svc.url().as_str(), "{ok}");
    assert!(ok["duration_us"].is_u64(), "{ok}");
    assert!(ok.get("forward_auth").is_none(), "{ok}");

    let decision = find(&|l| l["request_id"] == decision_id.as_str(), "the forward-auth decision");
    assert_eq!(decision["forward_auth"], true, "{decision}");
    assert_eq!(decision["route"], "private", "{decision}");
    assert_eq!(
        (decision["method"].as_str(), decision["path"].as_str()),
        (Some("GET"), Some("/private/z")),
        "{decision}"
    );
    assert_eq!(decision["user_id"], user_id.as_str(), "{decision}");
    assert!(decision.get("upstream").is_none(), "{decision}");

    let missing = find(&|l| l["request_id"] == missing_id.as_str(), "the request without a token");
    assert_eq!((missing["route"].as_str(), missing["status"].as_u64()), (Some("private"), Some(401)), "{missing}");
    assert!(missing.get("user_id").is_none(), "{missing}");
    assert!(missing.get("upstream").is_none(), "nothing was sent upstream: {missing}");

    let climbing = find(&|l| l["request_id"] == "bad-path-1", "the climbing path");
    assert_eq!(climbing["route"], "none", "{climbing}");
    assert_eq!(climbing["status"], 400, "{climbing}");
    assert_eq!(climbing["path"], "/open/..%2f..%2fetc", "the path as sent: {climbing}");
    find(&|l| l["route"] == "none" && l["method"] == "-" && l["path"] == "-", "the unparsable head");
    let api = find(&|l| l["path"] == "/auth/refresh", "the refresh");
    assert_eq!((api["route"].as_str(), api["status"].as_u64()), (Some("gateway"), Some(200)), "{api}");
    assert_eq!(api["request_id"], api_id.as_str(), "{api}");
    find(&|l| l["path"] == "/auth/login", "the login");
    assert_eq!(lines.len(), 8, "one line per request: {lines:#?}");

    // The same requests in the metrics (this process's own registry, so
    // the counts are exact).
    let metrics = p.metrics().await;
    let m = |name: &str, labels: &[(&str, &str)]| metric(&metrics, name, labels);
    assert_eq!(m("gateway_requests_total", &[("route", "private"), ("status", "200")]), 1.0, "{metrics}");
    assert_eq!(m("gateway_requests_total", &[("route", "private"), ("status", "401")]), 2.0, "{metrics}");
    assert_eq!(m("gateway_requests_total", &[("route", "none"), ("status", "400")]), 2.0, "{metrics}");
    assert_eq!(m("gateway_request_duration_seconds_count", &[("route", "private")]), 3.0, "{metrics}");
    assert_eq!(m("gateway_upstream_duration_seconds_count", &[("route", "private")]), 1.0, "{metrics}");
    assert_eq!(m("gateway_auth_failures_total", &[("reason", "missing")]), 1.0, "{metrics}");
    assert_eq!(m("gateway_auth_failures_total", &[("reason", "malformed")]), 1.0, "a refresh token: {metrics}");
    assert_eq!(m("gateway_auth_failures_total", &[]), 2.0, "{metrics}");
    assert_eq!(m("gateway_forward_auth_total", &[("route", "private"), ("status", "200")]), 1.0, "{metrics}");

    // The audit trail is in the log too: the login and the refresh, with
    // who and from where.
    let logs = p.logs();
    let audit: Vec<&Value> = logs.iter().filter(|l| l["target"] == "gateway::audit").map(|l| &l["fields"]).collect();
    let of = |event: &str| audit.iter().find(|a| a["event"] == event).copied();
    let login = of("login_succeeded").unwrap_or_else(|| panic!("no login_succeeded audit line: {audit:#?}"));
    assert_eq!(
        (login["user_id"].as_str(), login["ip"].as_str()),
        (Some(user_id.as_str()), Some("127.0.0.1")),
        "{login}"
    );
    assert_eq!(login["email"], EMAIL, "{login}");
    let refreshed = of("refresh_rotated").unwrap_or_else(|| panic!("no refresh_rotated audit line: {audit:#?}"));
    assert!(refreshed["detail"].as_str().is_some_and(|d| d.contains("session_id")), "{refreshed}");

    let all = p.stop().await;
    let new_access = rotated["access_token"].as_str().expect("rotated access token");
    let new_refresh = rotated["refresh_token"].as_str().expect("rotated refresh token");
    let signature = access.rsplit('.').next().expect("a JWT has a signature");
    for (what, secret) in [
        ("the access token", access.as_str()),
        ("the access token's signature", signature),
        ("the refresh token", refresh.as_str()),
        ("the rotated access token", new_access),
        ("the rotated refresh token", new_refresh),
        ("the password", PASSWORD),
    ] {
        assert!(!all.contains(secret), "{what} was logged:\n{all}");
    }
}

/// Writes `text` beside `path` and renames it over: no poll can see the
/// file half-written.
fn replace_file(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).expect("write the new config");
    std::fs::rename(&aside, path).expect("rename the new config over the old");
}

#[tokio::test]
async fn sighup_reloads_routes_and_keys_and_refuses_an_invalid_file() {
    let svc = spawn_upstream("hup").await;
    let first = route("first", "/first", &[svc.url()], "auth = \"public\"");
    let second = route("second", "/second", &[svc.url()], "auth = \"public\"");
    // No polling: only the signal can reload.
    let no_poll = |extra: String| TestOptions {
        server_extra: "config_poll = \"0s\"".to_owned(),
        ..TestOptions::with_extra(extra)
    };
    let p = Process::start(&no_poll(first.clone())).await;
    let client = Client::new();
    echo(client.get(p.url("/first/x")).send().await.expect("GET /first")).await;
    let keys = |client: Client, url: String| async move {
        let jwks: Value = client.get(url).send().await.expect("GET the JWKS").json().await.expect("JWKS JSON");
        jwks["keys"].as_array().map_or(0, Vec::len)
    };
    let jwks_url = p.url("/.well-known/jwks.json");
    assert_eq!(keys(client.clone(), jwks_url.clone()).await, 1);

    replace_file(&p.config, &process_config(&no_poll(format!("{first}{second}")), ""));
    run_cli(&p.config, &["keys", "generate"], "").await.expect("keys generate");
    // Control: with polling off, nothing changes by itself.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let resp = client.get(p.url("/second/x")).send().await.expect("GET /second");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "a reload happened without a signal");
    assert_eq!(keys(client.clone(), jwks_url.clone()).await, 1, "keys reloaded without a signal");

    p.signal("HUP");
    second_route_serves(&p, &client, "SIGHUP reloads the routes").await;
    p.wait_for_log("the SIGHUP", |l| l["fields"]["message"] == "SIGHUP: reloading configuration and keys").await;
    p.wait_for_log("the key reload", |l| l["fields"]["message"] == "signing keys reloaded").await;
    assert_eq!(keys(client.clone(), jwks_url.clone()).await, 2, "the new key is published");

    // An invalid file: refused with every error named, and both routes keep serving.
    let bad = [
        route("bad-prefix", "no-slash", &[svc.url()], "auth = \"public\""),
        route("bad-upstream", "/bad", &["not a url".to_owned()], "auth = \"public\""),
    ];
    replace_file(&p.config, &process_config(&no_poll(bad.concat()), ""));
    p.signal("HUP");
    let refused = p.wait_for_log("the refused reload", is_refusal).await;
    let error = refused["fields"]["error"].as_str().expect("the reload error");
    for field in ["routes[0].prefix", "routes[1].upstreams"] {
        assert!(error.contains(field), "the error does not name {field}: {error}");
    }
    one_reload_and_one_refusal(&p, &client).await;
    p.stop().await;
}

/// SIGHUP reads the listener's certificate and key again: with polling
/// off, a renewed pair is served only after the signal.
#[tokio::test]
async fn sighup_reloads_the_tls_certificate() {
    let certs = tempfile::tempdir().expect("create temp dir");
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    // Valid from 1 January of `from` to 1 January of `until`; years
    // counted from now, so the test holds whenever it runs. The expected
    // expiry is rcgen's own date, not one parsed back.
    let this_year = 1970 + SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() / 31_556_952;
    let this_year = i32::try_from(this_year).expect("a year");
    let pair = |from: i32, until: i32| {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("certificate parameters");
        params.not_before = rcgen::date_time_ymd(this_year + from, 1, 1);
        params.not_after = rcgen::date_time_ymd(this_year + until, 1, 1);
        let expiry = params.not_after.unix_timestamp() as f64;
        let key_pair = rcgen::KeyPair::generate().expect("a key pair");
        let cert = params.self_signed(&key_pair).expect("a self-signed certificate");
        (rcgen::CertifiedKey { cert, key_pair }, expiry)
    };
    // The new one's expiry is past 2049 (a GeneralizedTime in the certificate).
    let ((old, old_expiry), (new, new_expiry)) = (pair(-1, 5), pair(-1, 30));
    let (expired, _) = pair(-3, -1);
    let (early, _) = pair(1, 6);
    let expiry = |metrics: &str| {
        metric(metrics, "gateway_tls_certificate_expiry_timestamp_seconds", &[("cert", "server.tls.cert")])
    };
    let write = |c: &rcgen::CertifiedKey| {
        std::fs::write(&cert_path, c.cert.pem()).expect("write cert.pem");
        std::fs::write(&key_path, c.key_pair.serialize_pem()).expect("write key.pem");
    };
    write(&old);
    let mut roots = rustls::RootCertStore::empty();
    for c in [&old, &new] {
        roots.add(c.cert.der().clone()).expect("a root");
    }
    let opts = TestOptions {
        server_extra: "config_poll = \"0s\"".to_owned(),
        extra: format!("\n[server.tls]\ncert = {:?}\nkey = {:?}\n", cert_path.display(), key_path.display()),
        ..TestOptions::default()
    };
    let p = Process::start(&opts).await;
    assert_eq!(served_certificate(p.addr, &roots).await, old.cert.der().to_vec());
    assert_eq!(expiry(&p.metrics().await), old_expiry);

    // A renewal that has already expired, or is not valid yet, is refused:
    // the running one stays.
    for (case, pair, says) in [("expired", &expired, "expired"), ("not yet valid", &early, "valid only from")] {
        write(pair);
        p.signal("HUP");
        p.wait_for_log(case, |l| {
            l["fields"]["message"] == "TLS certificate reload refused; keeping the running one"
                && l["fields"]["error"].as_str().is_some_and(|e| e.contains(says))
        })
        .await;
        assert_eq!(served_certificate(p.addr, &roots).await, old.cert.der().to_vec(), "{case}: served");
        assert_eq!(expiry(&p.metrics().await), old_expiry, "{case}");
    }

    write(&new);
    // Control: with polling off, nothing changes by itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served_certificate(p.addr, &roots).await, old.cert.der().to_vec(), "reloaded without a signal");
    p.signal("HUP");
    p.wait_for_log("the certificate reload", |l| l["fields"]["message"] == "TLS certificate reloaded").await;
    assert_eq!(served_certificate(p.addr, &roots).await, new.cert.der().to_vec());
    assert_eq!(expiry(&p.metrics().await), new_expiry);
    p.stop().await;
}

/// SIGHUP also reads the upstream client's TLS files again: with polling
/// off, a renewed client certificate is presented only after the signal.
#[tokio::test]
async fn sighup_reloads_the_upstream_client_certificate() {
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("the upstream's certificate");
    // Valid until 1 January, `years` from now; and that date.
    let this_year = 1970 + SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() / 31_556_952;
    let this_year = i32::try_from(this_year).expect("a year");
    let pair = |years: i32| {
        let mut params = rcgen::CertificateParams::new(vec!["gateway".to_owned()]).expect("certificate parameters");
        params.not_after = rcgen::date_time_ymd(this_year + years, 1, 1);
        let expiry = params.not_after.unix_timestamp() as f64;
        let key_pair = rcgen::KeyPair::generate().expect("a key pair");
        let cert = params.self_signed(&key_pair).expect("a self-signed certificate");
        (rcgen::CertifiedKey { cert, key_pair }, expiry)
    };
    let ((trusted, trusted_expiry), (stranger, stranger_expiry)) = (pair(5), pair(3));
    let svc =
        spawn_mtls_upstream("mtls", &server.cert.pem(), &server.key_pair.serialize_pem(), &trusted.cert.pem()).await;
    let certs = tempfile::tempdir().expect("create temp dir");
    let path = |name: &str| certs.path().join(name);
    let write = |c: &rcgen::CertifiedKey| {
        std::fs::write(path("client.pem"), c.cert.pem()).expect("write client.pem");
        std::fs::write(path("client.key"), c.key_pair.serialize_pem()).expect("write client.key");
    };
    std::fs::write(path("ca.pem"), server.cert.pem()).expect("write ca.pem");
    write(&stranger);
    let upstream = format!(
        "\n[upstream]\nca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\npool_max_idle_per_host = 0\n\
         cooldown = \"0s\"\nplatform_roots = false\n",
        path("ca.pem"),
        path("client.pem"),
        path("client.key")
    );
    let opts = TestOptions {
        server_extra: "config_poll = \"0s\"".to_owned(),
        extra: route("mtls", "/mtls", &[format!("https://{}", svc.addr)], "auth = \"public\"") + &upstream,
        ..TestOptions::default()
    };
    let p = Process::start(&opts).await;
    let client = Client::builder().no_proxy().build().expect("build a client");
    let status = || async { client.get(p.url("/mtls/x")).send().await.expect("GET /mtls/x").status() };
    let expiry = |metrics: &str| {
        metric(metrics, "gateway_tls_certificate_expiry_timestamp_seconds", &[("cert", "upstream.client_cert")])
    };
    assert_eq!(status().await, StatusCode::BAD_GATEWAY, "a certificate the upstream does not trust");
    assert_eq!(expiry(&p.metrics().await), stranger_expiry);

    // Control: with polling off, nothing changes by itself.
    write(&trusted);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status().await, StatusCode::BAD_GATEWAY, "reloaded without a signal");
    p.signal("HUP");
    p.wait_for_log("the upstream TLS reload", |l| l["fields"]["message"] == "upstream TLS reloaded").await;
    assert_eq!(status().await, StatusCode::OK, "the renewed certificate is not presented");
    assert_eq!(svc.hits(), 1);
    assert_eq!(expiry(&p.metrics().await), trusted_expiry);
    p.stop().await;
}

/// Waits (10 s at most) until `/second/x` is served.
async fn second_route_serves(p: &Process, client: &Client, what: &str) {
    eventually(what, Duration::from_secs(10), || {
        let client = client.clone();
        let url = p.url("/second/x");
        async move { client.get(url).send().await.is_ok_and(|r| r.status() == StatusCode::OK) }
    })
    .await;
}

/// After one reload and one refused file: both routes still serve, and
/// the metrics count one of each.
async fn one_reload_and_one_refusal(p: &Process, client: &Client) {
    for path in ["/first/x", "/second/x"] {
        echo(client.get(p.url(path)).send().await.expect("GET after a refused reload")).await;
    }
    let metrics = p.metrics().await;
    assert_eq!(metric(&metrics, "gateway_config_reloads_total", &[("result", "ok")]), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "gateway_config_reloads_total", &[("result", "error")]), 1.0, "{metrics}");
}

fn is_refusal(line: &Value) -> bool {
    line["fields"]["message"] == "configuration reload refused; keeping the running routes"
}

#[tokio::test]
async fn the_watcher_picks_up_a_valid_file_and_refuses_an_invalid_one() {
    let svc = spawn_upstream("watched").await;
    let first = route("first", "/first", &[svc.url()], "auth = \"public\"");
    let second = route("second", "/second", &[svc.url()], "auth = \"public\"");
    let p = Process::start(&TestOptions::with_extra(first.clone())).await;
    let client = Client::new();
    replace_file(&p.config, &process_config(&TestOptions::with_extra(format!("{first}{second}")), ""));
    second_route_serves(&p, &client, "the watcher loads the new route").await;
    replace_file(&p.config, "[server\n");
    let refused = p.wait_for_log("the watcher's refused reload", is_refusal).await;
    assert!(refused["fields"]["error"].as_str().is_some_and(|e| e.contains("gateway.toml")), "{refused}");
    one_reload_and_one_refusal(&p, &client).await;
    p.stop().await;
}

/// How far the gateway's peak RSS may rise while carrying a body many times
/// larger. A proxy holding the body whole would rise by the body's size.
const FLAT: usize = 4 * MIB;
const MIB: usize = 1024 * 1024;

/// Streaming means flat memory: a 20 MiB response to a client that reads
/// slowly, and a 16 MiB upload to an upstream that reads slowly, leave the
/// gateway's peak RSS within [`FLAT`] of where it was (measured: under
/// 1 MiB). The slow reader on the far side makes the gateway the one that
/// would have to hold the bytes, if it held them.
#[tokio::test]
async fn bodies_stream_through_the_process_with_flat_memory() {
    let svc = spawn_upstream("flat").await;
    let lines = "auth = \"public\"\nmax_body = \"64MiB\"";
    let p = Process::start(&TestOptions::with_extra(route("files", "/files", &[svc.url()], lines))).await;
    let client = Client::new();
    // The same paths once with small bodies first, so that buffers, the
    // upstream pool and allocator arenas exist before measuring.
    slow_download(&client, &p, MIB).await;
    upload(&client, &p, MIB, 0).await;

    let before = p.reset_peak_rss();
    slow_download(&client, &p, 20 * MIB).await;
    let grown = p.peak_rss().saturating_sub(before);
    assert!(grown < FLAT, "a 20 MiB response raised the gateway's peak RSS by {grown} bytes (from {before})");

    let before = p.reset_peak_rss();
    upload(&client, &p, 16 * MIB, 30).await;
    let grown = p.peak_rss().saturating_sub(before);
    assert!(grown < FLAT, "a 16 MiB upload raised the gateway's peak RSS by {grown} bytes (from {before})");
    p.stop().await;
}

/// Downloads `total` bytes through the gateway, resting 20 ms after each MiB.
async fn slow_download(client: &Client, p: &Process, total: usize) {
    let url = p.url(&format!("/files/big?mode=big&bytes={total}"));
    let resp = client.get(url).send().await.expect("GET a big response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut received = 0_usize;
    while let Some(chunk) = stream.next().await {
        let before = received;
        received += chunk.expect("response body chunk").len();
        if before / MIB != received / MIB {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(received, total, "the response arrived incomplete");
}

/// Uploads `total` bytes through the gateway to an upstream resting
/// `pause_ms` after each MiB.
async fn upload(client: &Client, p: &Process, total: usize, pause_ms: u64) {
    let url = p.url(&format!("/files/up?pause_ms={pause_ms}"));
    let resp = client.post(url).body(vec![b'u'; total]).send().await.expect("POST a big body");
    assert_eq!(echo(resp).await.body_len(), total as u64, "the upload arrived incomplete");
}

/// `upstream.platform_roots`: a CA in the platform's trust store (here the
/// bundle `SSL_CERT_FILE` names, as `update-ca-certificates` writes one) is
/// trusted for https upstreams without `ca_file`, unless `platform_roots =
/// false`. A process of its own, because the store is read from the
/// environment.
#[tokio::test]
async fn https_upstreams_trust_the_platform_store_unless_told_not_to() {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("generate a self-signed certificate");
    let svc = spawn_tls_upstream("platform", &cert.pem(), &key_pair.serialize_pem()).await;
    let store = tempfile::tempdir().expect("create temp dir");
    let bundle = store.path().join("ca-certificates.crt");
    std::fs::write(&bundle, cert.pem()).expect("write the bundle");
    let env = [("SSL_CERT_FILE", bundle.as_path()), ("SSL_CERT_DIR", store.path())];
    let secure = route("secure", "/secure", &[format!("https://{}", svc.addr)], "auth = \"public\"");
    let client = Client::new();

    let p = Process::start_with_env(&TestOptions::with_extra(secure.clone()), "info", &env).await;
    let e = echo(client.get(p.url("/secure/x")).send().await.expect("GET /secure/x")).await;
    assert_eq!(e.upstream(), "platform", "{}", e.0);
    p.stop().await;

    let opts = TestOptions::with_extra(format!("{secure}\n[upstream]\nplatform_roots = false\n"));
    let p = Process::start_with_env(&opts, "info", &env).await;
    let resp = client.get(p.url("/secure/x")).send().await.expect("GET /secure/x");
    assert_error(resp, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    assert_eq!(svc.hits(), 1, "a request reached an upstream whose CA is not trusted");
    p.stop().await;
}

/// Connections to the redirect listener are in `gateway_connections_open`,
/// as they are in the `server.max_connections` budget: the gauge is the
/// figure that limit applies to. (Its own process: the gauge is global.)
#[tokio::test]
async fn redirect_connections_are_in_the_open_connections_gauge() {
    let certs = tempfile::tempdir().expect("create temp dir");
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    std::fs::write(&cert_path, pair.cert.pem()).expect("write cert.pem");
    std::fs::write(&key_path, pair.key_pair.serialize_pem()).expect("write key.pem");
    let opts = TestOptions {
        server_extra: "http_redirect_listen = \"127.0.0.1:0\"".to_owned(),
        extra: format!("\n[server.tls]\ncert = {:?}\nkey = {:?}\n", cert_path.display(), key_path.display()),
        ..TestOptions::default()
    };
    let p = Process::start(&opts).await;
    let line = p
        .wait_for_log("the redirect listener", |l| {
            l["fields"]["message"] == "redirecting plain HTTP to the TLS listener"
        })
        .await;
    let redirect: SocketAddr =
        line["fields"]["listen"].as_str().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("an address: {line}"));
    let open = |want: f64| {
        let p = &p;
        async move {
            eventually(&format!("{want} connections open"), Duration::from_secs(10), || async {
                metric(&p.metrics().await, "gateway_connections_open", &[]) == want
            })
            .await;
        }
    };
    open(0.0).await;
    // Two connections that have sent nothing yet (the header timeout is 10 s).
    let held = [
        tokio::net::TcpStream::connect(redirect).await.expect("connect to the redirect listener"),
        tokio::net::TcpStream::connect(redirect).await.expect("connect to the redirect listener"),
    ];
    open(2.0).await;
    drop(held);
    open(0.0).await;
    p.stop().await;
}
