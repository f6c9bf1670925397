//! The client's resilience, as docs/guides/rust-client.md promises it:
//! - a call refused with RESOURCE_EXHAUSTED is retried until the server
//!   accepts it, INVALID_ARGUMENT is never retried (counted on the server side,
//!   by a scripted in-process Teacher), and a real server whose queue is full
//!   refuses calls that the client then gets answered;
//! - the `Prefetcher` reopens a dropped stream and re-sends what was in flight:
//!   a `logitd serve` process killed (SIGKILL) mid-stream and restarted on the
//!   same port, every batch still delivered in order with the answer a fresh
//!   call gives; and a stream refused at open is reopened;
//! - a `Prefetcher` with no server at all gives up after its attempts and
//!   reports the error on each batch instead of spinning forever.

use crate::common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{batch, free_low_port, options, tiny};
use futures::{Stream, StreamExt};
use logitd_client::{
    ClientConfig, ClientError, Prefetched, Prefetcher, TeacherClient, TeacherTargets, TrainingBatch,
};
use logitd_proto::v1::{
    GetModelInfoRequest, ModelInfo, SampleLogitsRequest, SampleLogitsResponse, SampledSequence,
    teacher_server::{Teacher, TeacherServer},
};
use tonic::{Code, Request, Response, Status, transport::server::TcpIncoming};

// ---------------------------------------------------------------------------
// A scripted Teacher: refuses the first calls with a chosen status, then
// answers every position of every sequence with its next token (count k).

#[derive(Default)]
struct Script {
    /// Unary calls and stream opens refused before the first is accepted.
    refuse: AtomicU32,
    /// The status of a refusal.
    code: std::sync::Mutex<Option<Code>>,
    /// Unary SampleLogits calls received.
    unary_calls: AtomicU32,
    /// SampleLogitsStream calls received.
    stream_opens: AtomicU32,
}

impl Script {
    fn refusal(&self) -> Option<Status> {
        let code = self.code.lock().unwrap().expect("a refusal code");
        let left = self.refuse.load(Ordering::SeqCst);
        if code == Code::InvalidArgument {
            return Some(Status::invalid_argument("sequence 0 position 1: token id 999 >= 96"));
        }
        if left == 0 {
            return None;
        }
        self.refuse.store(left - 1, Ordering::SeqCst);
        Some(Status::new(code, "the queue is full (64 of 64 tokens)"))
    }
}

#[derive(Clone)]
struct Fake(Arc<Script>);

/// The fake's answer: position t of a sequence gets one id, the token at
/// t + 1 (or 0 at the end), drawn k times with log p = −(seed mod 5).
fn echo(req: &SampleLogitsRequest) -> SampleLogitsResponse {
    let k = if req.num_samples == 0 { 8 } else { req.num_samples };
    let sequences = req
        .sequences
        .iter()
        .map(|s| {
            let first = s.first_position as usize;
            let n = s.token_ids.len() - first;
            let logp = -((s.seed.unwrap_or(0) % 5) as f32);
            SampledSequence {
                first_position: s.first_position,
                offsets: (0..=n as u32).collect(),
                token_ids: (first..s.token_ids.len())
                    .map(|t| s.token_ids.get(t + 1).copied().unwrap_or(0))
                    .collect(),
                counts: vec![k; n],
                logprobs: vec![logp; n],
                packed_logprobs: vec![],
                lse: vec![1.5; n],
                ..Default::default()
            }
        })
        .collect();
    SampleLogitsResponse {
        sequences,
        seed: req.seed.unwrap_or(0),
        model_id: "scripted".into(),
        num_samples: k,
        temperature: 1.0,
        method: 1,
        value_encoding: 1,
    }
}

type Answers = Pin<Box<dyn Stream<Item = Result<SampleLogitsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Teacher for Fake {
    async fn sample_logits(
        &self,
        request: Request<SampleLogitsRequest>,
    ) -> Result<Response<SampleLogitsResponse>, Status> {
        self.0.unary_calls.fetch_add(1, Ordering::SeqCst);
        match self.0.refusal() {
            Some(status) => Err(status),
            None => Ok(Response::new(echo(request.get_ref()))),
        }
    }

    type SampleLogitsStreamStream = Answers;

    async fn sample_logits_stream(
        &self,
        request: Request<tonic::Streaming<SampleLogitsRequest>>,
    ) -> Result<Response<Answers>, Status> {
        self.0.stream_opens.fetch_add(1, Ordering::SeqCst);
        if let Some(status) = self.0.refusal() {
            return Err(status);
        }
        let answers = request.into_inner().map(|r| r.map(|r| echo(&r)));
        Ok(Response::new(Box::pin(answers)))
    }

    async fn get_model_info(
        &self,
        _request: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(ModelInfo {
            model_id: "scripted".into(),
            architecture: "llama".into(),
            vocab_size: 96,
            max_sequence_length: 64,
            dtype: "f32".into(),
            device: "cpu".into(),
            tokenizer_sha256: String::new(),
            default_num_samples: 8,
            max_num_samples: 64,
            ..Default::default()
        }))
    }
}

/// Serves the script on 127.0.0.1 (any port); returns its URI.
async fn scripted(refuse: u32, code: Code) -> (String, Arc<Script>) {
    let script = Arc::new(Script::default());
    script.refuse.store(refuse, Ordering::SeqCst);
    *script.code.lock().unwrap() = Some(code);
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let service = TeacherServer::new(Fake(script.clone()));
    tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming),
    );
    (format!("http://{addr}"), script)
}

/// The prefetcher's next batch, or a failure if it neither delivers nor ends
/// within 60 s (instead of hanging the test).
async fn next_within(prefetcher: &mut Prefetcher) -> Option<Prefetched> {
    tokio::time::timeout(Duration::from_secs(60), prefetcher.next())
        .await
        .expect("the prefetcher neither delivered a batch nor ended within 60 s")
}

fn fast_retries(uri: &str, attempts: u32) -> ClientConfig {
    let mut config = ClientConfig::new([uri.to_string()]);
    config.retry.max_attempts = attempts;
    config.retry.initial_backoff = Duration::from_millis(5);
    config.retry.max_backoff = Duration::from_millis(50);
    config.timeout = Duration::from_secs(30);
    config
}

/// What the scripted Teacher must answer for `sequences`, worked out here.
fn echoed(client: &TeacherClient, sequences: &[Vec<u32>], seed: u64) -> Vec<TeacherTargets> {
    client
        .requests(sequences, None, options(seed))
        .iter()
        .flat_map(|r| {
            let e = echo(r);
            e.sequences
                .iter()
                .map(|s| {
                    TeacherTargets::from_sequence(s, e.num_samples, e.value_encoding, e.method)
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_is_retried_until_the_server_accepts() {
    let (uri, script) = scripted(0, Code::ResourceExhausted).await;
    let client = TeacherClient::connect(fast_retries(&uri, 8)).await.unwrap();
    // Refused 5 times, accepted the 6th: within 8 attempts.
    script.refuse.store(5, Ordering::SeqCst);
    let b = batch(3, 1);
    let got = client.sample_targets(&b, None, options(4)).await.expect("accepted after retries");
    assert_eq!(script.unary_calls.load(Ordering::SeqCst), 6, "5 refusals + 1 answer");
    assert_eq!(got, echoed(&client, &b, 4));
    // Refused more often than the policy allows: the last status, after exactly
    // max_attempts calls.
    script.unary_calls.store(0, Ordering::SeqCst);
    script.refuse.store(100, Ordering::SeqCst);
    let e = client.sample_targets(&b, None, options(4)).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Rpc { status, attempts: 8 } if status.code() == Code::ResourceExhausted),
        "{e}"
    );
    assert_eq!(script.unary_calls.load(Ordering::SeqCst), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_never_retried() {
    let (uri, script) = scripted(0, Code::InvalidArgument).await;
    let client = TeacherClient::connect(fast_retries(&uri, 8)).await.unwrap();
    let e = client.sample_targets(&batch(2, 3), None, options(1)).await.unwrap_err();
    assert!(matches!(e, ClientError::Rpc { attempts: 1, .. }), "{e}");
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert_eq!(script.unary_calls.load(Ordering::SeqCst), 1, "the server saw one call");
    // The prefetcher reports it on the batch, once per batch, and goes on.
    let batches: Vec<TrainingBatch> = (0..3)
        .map(|i| TrainingBatch { sequences: batch(2, i), seed: i as u64, ..Default::default() })
        .collect();
    let mut prefetcher = Prefetcher::start(client, batches.into_iter(), 2, options(0));
    let mut codes = vec![];
    while let Some(item) = next_within(&mut prefetcher).await {
        match item.targets {
            Err(ClientError::Rpc { status, attempts }) => codes.push((status.code(), attempts)),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    assert_eq!(codes, vec![(Code::InvalidArgument, 1); 3]);
    assert_eq!(script.stream_opens.load(Ordering::SeqCst), 3, "one stream per failed batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetcher_reopens_a_stream_refused_with_resource_exhausted() {
    let (uri, script) = scripted(0, Code::ResourceExhausted).await;
    let client = TeacherClient::connect(fast_retries(&uri, 8)).await.unwrap();
    script.refuse.store(4, Ordering::SeqCst);
    let batches: Vec<TrainingBatch> = (0..10)
        .map(|i| TrainingBatch { sequences: batch(3, i), seed: i as u64, ..Default::default() })
        .collect();
    let mut prefetcher =
        Prefetcher::start(client.clone(), batches.clone().into_iter(), 3, options(0));
    let mut n = 0;
    while let Some(item) = next_within(&mut prefetcher).await {
        assert_eq!(item.batch, batches[n]);
        let targets = item.targets.unwrap_or_else(|e| panic!("batch {n}: {e}"));
        assert_eq!(targets, echoed(&client, &batches[n].sequences, batches[n].seed), "batch {n}");
        n += 1;
    }
    assert_eq!(n, 10);
    assert_eq!(script.stream_opens.load(Ordering::SeqCst), 5, "4 refused opens, then one stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetcher_with_no_server_reports_the_error_on_every_batch() {
    // A port where nothing listens (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let uri = format!("http://127.0.0.1:{port}");
    let e = TeacherClient::connect(fast_retries(&uri, 3)).await.err().expect("nothing listens");
    assert!(matches!(e, ClientError::Rpc { attempts: 3, .. }), "{e}");
    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    // A client that connected while a server was there, which has gone since.
    let client = dead_client(&uri).await;
    let batches: Vec<TrainingBatch> = (0..3)
        .map(|i| TrainingBatch { sequences: batch(2, i), seed: i as u64, ..Default::default() })
        .collect();
    let mut prefetcher = Prefetcher::start(client, batches.into_iter(), 2, options(0));
    let mut seen = vec![];
    while let Some(item) = next_within(&mut prefetcher).await {
        match item.targets {
            Err(ClientError::Rpc { status, attempts }) => seen.push((status.code(), attempts)),
            other => panic!("no server, yet {other:?}"),
        }
    }
    assert_eq!(seen, vec![(Code::Unavailable, 3); 3]);
}

/// A client whose endpoint is `uri` where nothing listens: connected through a
/// short-lived scripted server on that very port, which then goes away.
async fn dead_client(uri: &str) -> TeacherClient {
    let addr: std::net::SocketAddr = uri.trim_start_matches("http://").parse().unwrap();
    let script = Arc::new(Script::default());
    *script.code.lock().unwrap() = Some(Code::ResourceExhausted);
    let incoming = TcpIncoming::bind(addr).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TeacherServer::new(Fake(script)))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let client = TeacherClient::connect(fast_retries(uri, 3)).await.unwrap();
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    client
}

// ---------------------------------------------------------------------------
// Real `logitd serve` processes.

/// The `logitd` binary next to this test's `deps/` directory.
fn logitd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let bin = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").join("logitd");
    assert!(bin.is_file(), "{} is missing: `cargo build -p logitd`", bin.display());
    bin
}

/// A `logitd serve` process, killed when dropped.
struct Process {
    child: Child,
    uri: String,
    metrics: String,
}

impl Process {
    fn start(model: &Path, port: u16, extra: &[&str]) -> Process {
        let mut child = Command::new(logitd_bin())
            .args(["serve", "--model"])
            .arg(model)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("LOGITD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting logitd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "logitd: gRPC on ADDR, metrics on http://ADDR/metrics"
        let addr = line.split("gRPC on ").nth(1).and_then(|s| s.split(',').next()).expect(&line);
        let metrics = line.split("metrics on http://").nth(1).expect(&line).trim().to_string();
        Process { child, uri: format!("http://{addr}"), metrics }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Σ of `logitd_requests_total` samples with this status; fails when the
    /// server exposes no such series.
    async fn requests_with_status(&self, status: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (host, path) = self.metrics.split_once('/').unwrap();
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let get = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(get.as_bytes()).await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let label = format!("status=\"{status}\"");
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("logitd_requests_total{") && l.contains(&label))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(!values.is_empty(), "no logitd_requests_total with {label} in:\n{text}");
        values.iter().sum()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Same ids and counts exactly, log-probabilities within 1e-5 (a batch of
/// other sequences may round the forward differently).
fn same(a: &[TeacherTargets], b: &[TeacherTargets]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.offsets == y.offsets
                && x.token_ids == y.token_ids
                && x.counts == y.counts
                && x.first_position == y.first_position
                && x.logprobs.len() == y.logprobs.len()
                && x.logprobs.iter().zip(&y.logprobs).all(|(p, q)| (p - q).abs() < 1e-5)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_refuses_and_the_client_retries_until_accepted() {
    // One 48-token request fills most of the 64-token queue: of 24 calls sent
    // at once, most are refused at first.
    let server = Process::start(
        &tiny("llama"),
        0,
        &["--max-queue-tokens", "64", "--max-batch-tokens", "64", "--max-wait-ms", "1"],
    );
    let mut config = ClientConfig::new([server.uri.clone()]);
    config.retry.max_attempts = 200;
    config.retry.initial_backoff = Duration::from_millis(5);
    config.retry.max_backoff = Duration::from_millis(50);
    let client = TeacherClient::connect(config).await.unwrap();
    let batches: Vec<Vec<Vec<u32>>> = (0..24u32)
        .map(|i| {
            (0..2u32).map(|s| (0..24u32).map(|p| (p * 13 + s * 5 + i * 7) % 96).collect()).collect()
        })
        .collect();
    assert!(batches.iter().all(|b| b.iter().map(Vec::len).sum::<usize>() == 48));
    let results = futures::future::join_all(
        batches.iter().enumerate().map(|(i, b)| client.sample_targets(b, None, options(i as u64))),
    )
    .await;
    let refused = server.requests_with_status("RESOURCE_EXHAUSTED").await;
    assert!(refused >= 1.0, "the queue never refused a call: the test tested nothing");
    // Every call answered, as a call alone answers it.
    for (i, r) in results.into_iter().enumerate() {
        let got = r.unwrap_or_else(|e| panic!("call {i} failed despite the retries: {e}"));
        let alone = client.sample_targets(&batches[i], None, options(i as u64)).await.unwrap();
        assert!(same(&got, &alone), "call {i}: a different answer after retries");
    }
    eprintln!("{refused} refusals with RESOURCE_EXHAUSTED, all 24 calls answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prefetcher_survives_a_server_killed_mid_stream() {
    // Not an ephemeral port: while this server is down, no other test's
    // server (started on port 0) can take it.
    let port = free_low_port();
    let mut server = Process::start(&tiny("gemma2"), port, &["--max-wait-ms", "1"]);
    let mut config = ClientConfig::new([server.uri.clone()]);
    // About 20 s of retries (full jitter, 100 ms bound): room for the restart
    // on a loaded machine.
    config.retry.max_attempts = 400;
    config.retry.initial_backoff = Duration::from_millis(10);
    config.retry.max_backoff = Duration::from_millis(100);
    let client = TeacherClient::connect(config).await.unwrap();
    let batches: Vec<TrainingBatch> = (0..40)
        .map(|i| TrainingBatch {
            sequences: batch(3, i),
            seed: 100 + i as u64,
            ..Default::default()
        })
        .collect();
    let pulled = Arc::new(AtomicUsize::new(0));
    let source = {
        let pulled = pulled.clone();
        batches.clone().into_iter().inspect(move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        })
    };
    let mut prefetcher = Prefetcher::start(client.clone(), source, 4, options(0));
    let mut got = vec![];
    let mut killed_at = None;
    while let Some(item) = next_within(&mut prefetcher).await {
        assert_eq!(item.batch, batches[got.len()], "batches come back in order");
        let targets = item.targets.unwrap_or_else(|e| panic!("batch {}: {e}", got.len()));
        got.push(targets);
        if got.len() == 8 {
            // Batches are in flight on the stream: kill the server under it,
            // and bring a new one up on the same port a little later.
            let in_flight = pulled.load(Ordering::SeqCst) - got.len();
            assert!(in_flight >= 1, "nothing in flight when the server was killed");
            server.kill();
            killed_at = Some(in_flight);
            tokio::time::sleep(Duration::from_millis(300)).await;
            server = Process::start(&tiny("gemma2"), port, &["--max-wait-ms", "1"]);
        }
    }
    assert_eq!(got.len(), 40, "every batch delivered");
    // A fresh client, fresh calls to the restarted server: the same answers.
    let fresh = TeacherClient::connect(ClientConfig::new([server.uri.clone()])).await.unwrap();
    for (i, (b, t)) in batches.iter().zip(&got).enumerate() {
        let want = fresh.sample_targets(&b.sequences, None, options(b.seed)).await.unwrap();
        assert!(same(t, &want), "batch {i}: the prefetched targets differ from a fresh call");
    }
    eprintln!("killed with {} batches pulled ahead; 40 batches delivered", killed_at.unwrap());
}
