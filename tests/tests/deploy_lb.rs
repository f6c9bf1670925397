//! The deployment of `deploy/`, run for real on 127.0.0.1: two `logitd`
//! replicas (the real binary, the tiny teacher), nginx with
//! `deploy/nginx/nginx.conf`, HAProxy with `deploy/haproxy/haproxy.cfg`, and
//! Prometheus with `deploy/prometheus/prometheus.yml` and its rules. Only
//! addresses, intervals and paths are rewritten in the shipped files.
//!
//! Shown: calls through either balancer reach both replicas (counted by each
//! replica's metrics, read through Prometheus' HTTP API), every reply equals the
//! one a replica gives directly for the same request (sampling is deterministic
//! given the seed), and when a replica is killed mid-load every call still gets
//! its answer (the client retries through the balancer) while Prometheus reports
//! the target down and the shipped `LogitdReplicaDown` alert goes pending.
//!
//! Needs `nginx`, `haproxy` and `prometheus` (Debian packages of those names;
//! `.ci/run` installs them). A missing tool fails the test; set
//! `LOGITD_SKIP_DEPLOY_LB=1` to skip it on purpose (it then says so loudly).
//! It runs the `logitd` binary of this target directory (built by `cargo test
//! --workspace` or `cargo build -p logitd`), or `LOGITD_BIN`.

use crate::common;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use logitd_client::{ClientConfig, RetryPolicy, TeacherClient};
use logitd_proto::v1::{SampleLogitsRequest, SampleLogitsResponse, Sequence};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// The `logitd` binary next to this test's `deps/` directory, or `LOGITD_BIN`.
fn logitd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOGITD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .join("logitd");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p logitd` (`cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// A program from PATH or the sbin directories (nginx and haproxy live in /usr/sbin).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!("logitd-deploy-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            eprintln!("deploy_lb: files kept in {}", self.0.display());
        }
    }
}

/// A child process that is stopped when dropped (also when the test panics):
/// SIGTERM, then SIGKILL if it has not exited within 5 s. On a panic the tail
/// of its log is printed.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr (and stdout, unless the caller piped it) to `log`.
    fn spawn(name: &str, cmd: &mut Command, log: &Path, pipe_stdout: bool) -> Proc {
        let file = fs::File::create(log).unwrap();
        if !pipe_stdout {
            cmd.stdout(file.try_clone().unwrap());
        }
        let child = cmd
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name: name.into(), child, log: log.into() }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!("---- last lines of {} ({}):", self.name, self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A `logitd serve` replica on 127.0.0.1 (ports chosen by the kernel).
struct Replica {
    proc: Proc,
    grpc: String,
    metrics: String,
}

impl Replica {
    fn start(name: &str, dir: &Path) -> Replica {
        let model = repo().join("server/tests/fixtures/tiny/llama");
        let mut cmd = Command::new(logitd_bin());
        cmd.args(["serve", "--model"])
            .arg(&model)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("LOGITD_LOG", "info")
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn(name, &mut cmd, &dir.join(format!("{name}.log")), true);
        let log = proc.log.clone();
        // Within a deadline; the pipe stays open on the reading thread.
        let line =
            common::first_line(&mut proc.child, || fs::read_to_string(&log).unwrap_or_default());
        // "logitd: gRPC on ADDR, metrics on http://ADDR/metrics"
        let grpc = line.split("gRPC on ").nth(1).and_then(|s| s.split(',').next());
        let metrics = line.split("metrics on http://").nth(1).and_then(|s| s.split('/').next());
        let (Some(grpc), Some(metrics)) = (grpc, metrics) else {
            panic!("{name}: unexpected first line {line:?}; log: {}", proc.log())
        };
        Replica { grpc: grpc.to_string(), metrics: metrics.trim().to_string(), proc }
    }
}

/// `n` distinct free ports below the ephemeral range (so no server started on
/// port 0 elsewhere can be handed one before our program binds it).
fn free_ports(n: usize) -> Vec<u16> {
    let start = 20_000 + (std::process::id() % 9_000) as u16;
    let held: Vec<std::net::TcpListener> = (start..30_000)
        .filter_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
        .take(n)
        .collect();
    assert_eq!(held.len(), n, "free ports in {start}..30000");
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// `text` with `from` replaced by `to`, which must occur exactly once: the
/// shipped file changed shape if it does not.
fn rewrite(text: &str, from: &str, to: &str, file: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{file}: expected {from:?} exactly once");
    text.replace(from, to)
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// HTTP/1.0 GET (the body is everything up to the close): status and body;
/// `None` on any failure, or when no full answer came within 10 s.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.ok()?;
        Some(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), get).await.ok()??;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query through Prometheus' HTTP API: (labels, value) per series.
async fn prom_query(prom: &str, q: &str) -> Vec<(HashMap<String, String>, f64)> {
    let path = format!("/api/v1/query?query={}", url_encode(q));
    let Some((200, body)) = http_get(prom, &path).await else { return vec![] };
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = r["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
            (labels, value)
        })
        .collect()
}

const OK_CALLS: &str = r#"logitd_requests_total{job="logitd", method="SampleLogits", status="OK"}"#;

/// SampleLogits calls each replica answered OK, as Prometheus has them, once
/// Prometheus has scraped what each replica's own /metrics says now. Each
/// replica has answered calls already, so a missing series fails.
async fn settled_ok_calls(prom: &str, replicas: &[&Replica]) -> Vec<f64> {
    let mut out = vec![];
    for r in replicas {
        let (_, text) = http_get(&r.metrics, "/metrics").await.expect("the replica's /metrics");
        let now: f64 = text
            .lines()
            .find(|l| {
                l.starts_with("logitd_requests_total{")
                    && l.contains(r#"method="SampleLogits""#)
                    && l.contains(r#"status="OK""#)
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse::<f64>().unwrap())
            .unwrap_or_else(|| {
                panic!("no OK SampleLogits count in {}/metrics:\n{text}", r.metrics)
            });
        let q = OK_CALLS.replace("}", &format!(r#", instance="{}"}}"#, r.metrics));
        let seen = wait_for(
            &format!("Prometheus to scrape {} OK calls from {}", now, r.metrics),
            Duration::from_secs(30),
            || {
                let q = q.clone();
                async move {
                    let v = prom_query(prom, &q).await;
                    v.first().map(|(_, x)| *x).filter(|&seen| seen == now)
                }
            },
        )
        .await;
        out.push(seen);
    }
    out
}

/// Deterministic pseudo-random numbers (splitmix64).
struct Mix(u64);

impl Mix {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// Distinct requests: 1 to 3 sequences of 4 to 40 tokens of the tiny teacher
/// (vocabulary 96), k = 64, each request with its own seed.
fn requests(n: usize) -> Vec<SampleLogitsRequest> {
    let mut r = Mix(7);
    (0..n)
        .map(|i| SampleLogitsRequest {
            sequences: (0..1 + r.next(3))
                .map(|_| {
                    let len = 4 + r.next(37) as u32;
                    Sequence {
                        token_ids: (0..len).map(|_| r.next(96) as u32).collect(),
                        first_position: r.next(len as u64) as u32,
                        seed: None,
                        ..Default::default()
                    }
                })
                .collect(),
            num_samples: 64,
            temperature: None,
            seed: Some(1000 + i as u64),
            method: 0,
            value_encoding: 0,
            ..Default::default()
        })
        .collect()
}

/// The same answer: ids and counts exactly, log-probabilities to float
/// rounding (a request may share its packed batch with different neighbours).
fn assert_same(got: &SampleLogitsResponse, want: &SampleLogitsResponse, what: &str) {
    assert_eq!(
        (got.seed, &got.model_id, got.num_samples, got.sequences.len()),
        (want.seed, &want.model_id, want.num_samples, want.sequences.len()),
        "{what}"
    );
    for (g, w) in got.sequences.iter().zip(&want.sequences) {
        assert_eq!(g.first_position, w.first_position, "{what}");
        assert_eq!(g.offsets, w.offsets, "{what}");
        assert_eq!(g.token_ids, w.token_ids, "{what}");
        assert_eq!(g.counts, w.counts, "{what}");
        assert_eq!(g.logprobs.len(), w.logprobs.len(), "{what}");
        assert_eq!(g.lse.len(), w.lse.len(), "{what}");
        for (x, y) in g.logprobs.iter().zip(&w.logprobs).chain(g.lse.iter().zip(&w.lse)) {
            assert!((x - y).abs() < 1e-5, "{what}: {x} vs {y}");
        }
    }
}

async fn connect(uri: &str) -> TeacherClient {
    let mut config = ClientConfig::new([uri.to_string()]);
    config.timeout = Duration::from_secs(30);
    config.retry = RetryPolicy {
        max_attempts: 10,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(2),
    };
    TeacherClient::connect(config).await.unwrap_or_else(|e| panic!("connecting to {uri}: {e}"))
}

/// Sends call `i` (request `i % templates`) `n` times through `client`, 16 at
/// once, checks each reply against the direct answer, and counts replies in `done`.
async fn drive(
    client: TeacherClient,
    templates: Arc<Vec<SampleLogitsRequest>>,
    want: Arc<Vec<SampleLogitsResponse>>,
    n: usize,
    done: Arc<AtomicUsize>,
    via: &'static str,
) {
    futures::stream::iter(0..n)
        .map(|i| {
            let (client, templates, want, done) =
                (client.clone(), templates.clone(), want.clone(), done.clone());
            async move {
                let k = i % templates.len();
                let got = client
                    .sample(templates[k].clone())
                    .await
                    .unwrap_or_else(|e| panic!("call {i} through {via}: {e}"));
                assert_same(&got, &want[k], &format!("call {i} through {via}"));
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// Set to 1 to skip this test on purpose (a machine without the tools).
const SKIP: &str = "LOGITD_SKIP_DEPLOY_LB";

/// The three tools, or `None` when the test is skipped on purpose (`SKIP`=1,
/// said loudly). A missing tool fails the test.
fn tools() -> Option<(PathBuf, PathBuf, PathBuf)> {
    if std::env::var(SKIP).is_ok_and(|v| v == "1") {
        eprintln!(
            "\n!!!!! SKIPPED on purpose ({SKIP}=1): nginx, HAProxy and Prometheus were NOT \
             run; the shipped deploy/ configs are untested here !!!!!\n"
        );
        return None;
    }
    let found = (find_tool("nginx"), find_tool("haproxy"), find_tool("prometheus"));
    if let (Some(n), Some(h), Some(p)) = found.clone() {
        return Some((n, h, p));
    }
    let missing: Vec<&str> = [("nginx", &found.0), ("haproxy", &found.1), ("prometheus", &found.2)]
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    panic!(
        "deploy_lb needs {missing:?} on PATH or in /usr/sbin (Debian: apt-get install nginx \
         haproxy prometheus; .ci/run installs them). To skip this test on purpose: {SKIP}=1"
    );
}

#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_nginx_and_haproxy_scraped_by_prometheus() {
    let Some((nginx, haproxy, prometheus)) = tools() else { return };
    let started = Instant::now();
    let tmp = TempDir::new();
    let dir = tmp.0.clone();
    let deploy = repo().join("deploy");

    // Two replicas, and the answers each gives directly.
    let a = Replica::start("replica-a", &dir);
    let mut b = Replica::start("replica-b", &dir);
    let direct_a = connect(&format!("http://{}", a.grpc)).await;
    let direct_b = connect(&format!("http://{}", b.grpc)).await;
    let templates = Arc::new(requests(24));
    let mut want = vec![];
    for (i, r) in templates.iter().enumerate() {
        let from_a = direct_a.sample(r.clone()).await.unwrap();
        let from_b = direct_b.sample(r.clone()).await.unwrap();
        assert_same(&from_b, &from_a, &format!("request {i}: replica b against replica a"));
        want.push(from_a);
    }
    let want = Arc::new(want);

    let ports = free_ports(3);
    let (nginx_port, haproxy_port, prom_port) = (ports[0], ports[1], ports[2]);

    // nginx with the shipped config: upstreams and listen address rewritten;
    // pid and startup log in the temp dir (-p prefix for its temp files).
    let f = "deploy/nginx/nginx.conf";
    let mut conf = fs::read_to_string(deploy.join("nginx/nginx.conf")).unwrap();
    conf = rewrite(&conf, "10.0.0.11:50051", &a.grpc, f);
    conf = rewrite(&conf, "10.0.0.12:50051", &b.grpc, f);
    conf =
        rewrite(&conf, "listen 50051 http2;", &format!("listen 127.0.0.1:{nginx_port} http2;"), f);
    let prefix = dir.join("nginx");
    fs::create_dir_all(&prefix).unwrap();
    fs::write(prefix.join("nginx.conf"), conf).unwrap();
    let pid = prefix.join("nginx.pid");
    let nginx = Proc::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .arg("-e")
            .arg(prefix.join("startup.log"))
            .arg("-g")
            .arg(format!("daemon off; pid {};", pid.display())),
        &dir.join("nginx.log"),
        false,
    );

    // HAProxy with the shipped config: servers and bind address rewritten.
    let f = "deploy/haproxy/haproxy.cfg";
    let mut cfg = fs::read_to_string(deploy.join("haproxy/haproxy.cfg")).unwrap();
    cfg = rewrite(&cfg, "10.0.0.11:50051", &a.grpc, f);
    cfg = rewrite(&cfg, "10.0.0.12:50051", &b.grpc, f);
    cfg = rewrite(
        &cfg,
        "bind :50051 proto h2",
        &format!("bind 127.0.0.1:{haproxy_port} proto h2"),
        f,
    );
    fs::write(dir.join("haproxy.cfg"), cfg).unwrap();
    let haproxy_started = Instant::now();
    let haproxy = Proc::spawn(
        "haproxy",
        Command::new(haproxy).arg("-db").arg("-f").arg(dir.join("haproxy.cfg")),
        &dir.join("haproxy.log"),
        false,
    );

    // Prometheus with the shipped config and rules: targets, 1 s intervals,
    // the rules' absolute path.
    let f = "deploy/prometheus/prometheus.yml";
    let mut yml = fs::read_to_string(deploy.join("prometheus/prometheus.yml")).unwrap();
    yml = rewrite(&yml, "scrape_interval: 15s", "scrape_interval: 1s", f);
    yml = rewrite(&yml, "evaluation_interval: 15s", "evaluation_interval: 1s", f);
    let rules = deploy.join("prometheus/logitd-rules.yml");
    yml = rewrite(&yml, "- logitd-rules.yml", &format!("- {}", rules.display()), f);
    yml = rewrite(
        &yml,
        r#"["10.0.0.11:9090", "10.0.0.12:9090"]"#,
        &format!(r#"["{}", "{}"]"#, a.metrics, b.metrics),
        f,
    );
    fs::write(dir.join("prometheus.yml"), yml).unwrap();
    let prom = format!("127.0.0.1:{prom_port}");
    let _prometheus = Proc::spawn(
        "prometheus",
        Command::new(prometheus)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address={prom}"))
            .arg("--log.level=warn"),
        &dir.join("prometheus.log"),
        false,
    );
    wait_for("Prometheus to be ready", Duration::from_secs(60), || async {
        matches!(http_get(&prom, "/-/ready").await, Some((200, _))).then_some(())
    })
    .await;
    for port in [nginx_port, haproxy_port] {
        wait_for(&format!("a listener on {port}"), Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
    }
    wait_for("Prometheus to see both replicas up", Duration::from_secs(30), || async {
        let up = prom_query(&prom, r#"up{job="logitd"} == 1"#).await;
        (up.len() == 2).then_some(())
    })
    .await;

    // 1. Through nginx: 300 calls, every reply correct, both replicas served a
    //    share (each replica's OK-call counter, read through Prometheus).
    let before = settled_ok_calls(&prom, &[&a, &b]).await;
    let via_nginx = connect(&format!("http://127.0.0.1:{nginx_port}")).await;
    let n = 300;
    let done = Arc::new(AtomicUsize::new(0));
    drive(via_nginx.clone(), templates.clone(), want.clone(), n, done.clone(), "nginx").await;
    assert_eq!(done.load(Ordering::SeqCst), n);
    let after = settled_ok_calls(&prom, &[&a, &b]).await;
    let share: Vec<f64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
    eprintln!("nginx: replica a answered {}, replica b {} of {n} calls", share[0], share[1]);
    assert_eq!(share[0] + share[1], n as f64, "every call answered once, by a or b");
    assert!(share.iter().all(|&s| s >= 0.1 * n as f64), "both replicas served a share: {share:?}");

    // 2. Through HAProxy (after its gRPC health checks have run a few times:
    //    inter 2 s, fall 2, so failing checks would have taken a replica out).
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(haproxy_started.elapsed())).await;
    let before = after;
    let via_haproxy = connect(&format!("http://127.0.0.1:{haproxy_port}")).await;
    let m = 100;
    drive(via_haproxy.clone(), templates.clone(), want.clone(), m, Arc::default(), "haproxy").await;
    let after = settled_ok_calls(&prom, &[&a, &b]).await;
    let share: Vec<f64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
    eprintln!("haproxy: replica a answered {}, replica b {} of {m} calls", share[0], share[1]);
    assert_eq!(share[0] + share[1], m as f64);
    assert!(share.iter().all(|&s| s >= 0.1 * m as f64), "both replicas served a share: {share:?}");
    assert!(
        !haproxy.log().contains(" is DOWN"),
        "HAProxy's health check failed: {}",
        haproxy.log()
    );

    // The images' HEALTHCHECK command (deploy/docker/Dockerfile.cpu), run as
    // Docker would, against replica a: healthy.
    let healthcheck = docker_healthcheck();
    let healthy = |metrics: &str| {
        Command::new(&healthcheck[0])
            .args(&healthcheck[1..])
            .env("LOGITD_METRICS_LISTEN", metrics)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(healthy(&a.metrics), "the HEALTHCHECK fails on a serving replica");

    // 3. Kill replica b (SIGKILL) while 300 calls go through nginx: every call
    //    still gets its (correct) answer.
    let done = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(drive(
        via_nginx.clone(),
        templates.clone(),
        want.clone(),
        n,
        done.clone(),
        "nginx, b killed mid-load",
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < 60 {
        assert!(Instant::now() < deadline, "60 calls not answered within 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    b.proc.kill();
    let at_kill = done.load(Ordering::SeqCst);
    load.await.expect("every call answered correctly while b was killed");
    eprintln!("killed replica b after {at_kill} of {n} calls; all {n} answered");
    assert!(n - at_kill >= 100, "the kill came too late to be mid-load ({at_kill} of {n} done)");
    assert_eq!(done.load(Ordering::SeqCst), n);
    let nginx_log = nginx.log();
    assert!(
        nginx_log.contains(&format!("upstream: \"grpc://{}\"", b.grpc)),
        "nginx never failed over from b (its log should show failed connections to b)"
    );

    // Prometheus: b down, a up; the shipped alert LogitdReplicaDown is pending
    // for b (its `for` is 2 m, longer than this test).
    wait_for("Prometheus to report b down and a up", Duration::from_secs(30), || async {
        let up = prom_query(&prom, r#"up{job="logitd"}"#).await;
        let of = |inst: &str| up.iter().find(|(l, _)| l["instance"] == inst).map(|(_, v)| *v);
        (of(&b.metrics) == Some(0.0) && of(&a.metrics) == Some(1.0)).then_some(())
    })
    .await;
    wait_for("LogitdReplicaDown pending for b", Duration::from_secs(30), || async {
        let (_, body) = http_get(&prom, "/api/v1/alerts").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .any(|al| {
                al["labels"]["alertname"] == "LogitdReplicaDown"
                    && al["labels"]["instance"] == b.metrics.as_str()
            })
            .then_some(())
    })
    .await;
    // The recording rules run on the real metrics too.
    let saturation = prom_query(&prom, "instance:logitd_queue_saturation:ratio").await;
    assert!(
        saturation.iter().any(|(l, v)| l["instance"] == a.metrics && (0.0..=1.0).contains(v)),
        "instance:logitd_queue_saturation:ratio for a: {saturation:?}"
    );
    assert!(!healthy(&b.metrics), "the HEALTHCHECK passes on a killed replica");

    // HAProxy's health check takes b out; calls through HAProxy still succeed.
    wait_for("HAProxy to mark b down", Duration::from_secs(30), || async {
        haproxy.log().contains("logitd/logitd-1 is DOWN").then_some(())
    })
    .await;
    drive(via_haproxy, templates.clone(), want.clone(), 50, Arc::default(), "haproxy, b down")
        .await;
    assert!(!haproxy.log().contains("logitd/logitd-0 is DOWN"), "HAProxy took a out");

    eprintln!("deploy_lb: {:.1} s", started.elapsed().as_secs_f64());
    drop(a);
}

/// The exec-form HEALTHCHECK CMD of deploy/docker/Dockerfile.cpu, as argv.
fn docker_healthcheck() -> Vec<String> {
    let text = fs::read_to_string(repo().join("deploy/docker/Dockerfile.cpu")).unwrap();
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("Dockerfile.cpu has a HEALTHCHECK");
    let json = line.split_once(" CMD ").expect("HEALTHCHECK ... CMD [...]").1.trim();
    serde_json::from_str(json).expect("the CMD is in exec (JSON) form")
}
