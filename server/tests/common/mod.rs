//! A real `logitd serve` process on 127.0.0.1:0 for the service tests: started
//! from the test's binary, killed when dropped.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use logitd_proto::v1::{SampleLogitsRequest, Sequence, teacher_client::TeacherClient};
use tonic::transport::Channel;

pub fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny").join(name)
}

pub struct Server {
    pub child: Child,
    pub grpc: String,
    pub metrics: String,
    pub stderr: PathBuf,
    /// `host:port` of the HTTP front, when started with --http-listen.
    pub http: Option<String>,
}

impl Server {
    /// Starts `logitd serve --model MODEL EXTRA...` and waits for its address line.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        Self::start_with_log(model, extra, "logitd=debug,info")
    }

    /// [`start`](Self::start) with this log filter.
    pub fn start_with_log(model: &Path, extra: &[&str], log: &str) -> Server {
        let stderr = std::env::temp_dir().join(format!(
            "logitd-test-{}-{}.log",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ rand_u64()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_logitd"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("LOGITD_LOG", log)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting logitd");
        let stdout = child.stdout.take().unwrap();
        let mut server =
            Server { child, grpc: String::new(), metrics: String::new(), stderr, http: None };
        // "logitd: gRPC on ADDR, metrics on http://ADDR/metrics", printed once the
        // ports are bound; read on a thread so a server that never prints it
        // fails the test (with its log) instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(STARTUP) {
            Ok(line) => line,
            Err(_) => {
                panic!("logitd printed no address line within {STARTUP:?}; log:\n{}", server.log())
            }
        };
        let grpc = line.split("gRPC on ").nth(1).and_then(|s| s.split(',').next());
        let metrics = line.split("metrics on ").nth(1);
        let (Some(grpc), Some(metrics)) = (grpc, metrics) else {
            // Give a failing server a moment to finish writing its log.
            std::thread::sleep(Duration::from_millis(200));
            panic!("logitd's first line is {line:?}, not its addresses; log:\n{}", server.log())
        };
        server.http =
            line.split("HTTP on ").nth(1).and_then(|s| s.split(',').next()).map(str::to_string);
        server.grpc = format!("http://{grpc}");
        server.metrics = metrics.trim().to_string();
        server
    }

    /// A channel to the gRPC port, connected within [`STARTUP`]; fails with
    /// the server's log otherwise. The model may still be loading.
    pub async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(self.grpc.clone()).unwrap();
        let deadline = Instant::now() + STARTUP;
        loop {
            let error = match endpoint.connect().await {
                Ok(c) => return c,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "could not connect to {} within {STARTUP:?} ({error:?}); log:\n{}",
                self.grpc,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `f` every 20 ms until it gives a value; fails with the server's
    /// log when `timeout` passes first.
    pub async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most `timeout`) for the process to exit; fails with its log.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn client(&self) -> TeacherClient<Channel> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(c) = TeacherClient::connect(self.grpc.clone()).await {
                let mut c = c.max_decoding_message_size(256 << 20);
                // Ready once GetModelInfo answers (the model is loaded).
                if c.get_model_info(logitd_proto::v1::GetModelInfoRequest {}).await.is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "server not ready; log: {}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 60 s) for the process to exit, then returns its log.
    pub fn wait_log(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.child_running(), "the server did not exit; log: {}", self.log());
        self.log()
    }

    /// Whether the process has not exited.
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    pub async fn metrics_text(&self) -> String {
        let url = self.metrics.strip_prefix("http://").unwrap();
        let (host, path) = url.split_once('/').unwrap();
        let get = async {
            let mut stream = tokio::net::TcpStream::connect(host).await?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(
                    format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
            let mut body = String::new();
            stream.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        let body = match tokio::time::timeout(Duration::from_secs(30), get).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => panic!("GET {}: {e}; log:\n{}", self.metrics, self.log()),
            Err(_) => panic!("GET {}: no answer in 30 s; log:\n{}", self.metrics, self.log()),
        };
        let (head, body) = body.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// The value of a sample line `name{labels} value` (labels as written);
    /// `None` when the exposition has no such series. A line that is there but
    /// does not parse fails.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_in(&self.metrics_text().await, series)
    }

    /// [`metric`](Self::metric) of a series that must be there: fails, with
    /// the whole exposition, when it is missing (a renamed or unrecorded
    /// metric must not read as 0).
    pub async fn metric_value(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        metric_in(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }
}

/// How long a server may take to print its addresses or accept a connection.
pub const STARTUP: Duration = Duration::from_secs(60);

/// The value of the sample line `series value` in a Prometheus exposition.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(series)?.strip_prefix(' ')?;
        Some(v.trim().parse().unwrap_or_else(|e| panic!("{l:?}: {e}")))
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

fn rand_u64() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() as u128
}

/// The cached demo teacher (SmolLM2-135M, vocabulary 49,152), fetched by
/// tests/fetch-teachers.sh.
pub fn demo_teacher() -> PathBuf {
    let p = logitd::model::demo_teacher();
    assert!(p.exists(), "{} is missing: run tests/fetch-teachers.sh", p.display());
    p
}

pub fn seq(tokens: &[u32], first_position: u32, seed: Option<u64>) -> Sequence {
    Sequence { token_ids: tokens.to_vec(), first_position, seed, ..Default::default() }
}

pub fn request(sequences: Vec<Sequence>, k: u32, seed: u64) -> SampleLogitsRequest {
    SampleLogitsRequest {
        sequences,
        num_samples: k,
        temperature: None,
        seed: Some(seed),
        method: 0,
        value_encoding: 0,
        ..Default::default()
    }
}

/// The same draws (ids and counts exactly) and log-probabilities within 1e-5:
/// a batch of different composition may round the forward differently.
pub fn same_answer(
    a: &logitd_proto::v1::SampleLogitsResponse,
    b: &logitd_proto::v1::SampleLogitsResponse,
) -> bool {
    a.seed == b.seed
        && a.sequences.len() == b.sequences.len()
        && a.sequences.iter().zip(&b.sequences).all(|(x, y)| {
            x.offsets == y.offsets
                && x.token_ids == y.token_ids
                && x.counts == y.counts
                && x.logprobs.len() == y.logprobs.len()
                && x.logprobs.iter().zip(&y.logprobs).all(|(p, q)| (p - q).abs() < 1e-5)
        })
}
