//! The bad-input corpus: malformed requests of every kind sent to a real
//! `logitd serve` process, each of which must get the right gRPC status and a
//! message naming the problem, while a canary client keeps calling and must
//! get exactly the answer it got before the corpus started.
//!
//! The expected codes come from the gRPC specification
//! (doc/statuscodes.md, doc/compression.md) and from DESIGN.md's validation
//! rules, not from the server's output. Where tonic picks the code itself
//! (undecodable bytes: INTERNAL, like grpc-go and grpc-java; an over-limit
//! message: OUT_OF_RANGE; a passed grpc-timeout: CANCELLED "Timeout
//! expired" when tonic's own deadline layer answers first) the README says so.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Server, request, same_answer, seq, tiny};
use logitd_proto::v1::{SampleLogitsRequest, SampleLogitsResponse, SamplingMethod, ValueEncoding};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

const VOCAB: u32 = 96; // the tiny qwen3 fixture
const MAX_LEN: u32 = 32;
const MAX_K: u32 = 512;
const QUEUE: u32 = 2048;
const MAX_MESSAGE: usize = 64 << 10;
const PATH: &str = "/logitd.v1.Teacher/SampleLogits";
const STREAM_PATH: &str = "/logitd.v1.Teacher/SampleLogitsStream";

fn start() -> Server {
    Server::start(
        &tiny("qwen3"),
        &[
            "--max-num-samples",
            &MAX_K.to_string(),
            "--max-sequence-length",
            &MAX_LEN.to_string(),
            "--max-queue-tokens",
            &QUEUE.to_string(),
            "--max-message-bytes",
            &MAX_MESSAGE.to_string(),
        ],
    )
}

fn ok() -> SampleLogitsRequest {
    request(vec![seq(&[1, 2, 3], 0, None)], 16, 1)
}

fn with(f: impl FnOnce(&mut SampleLogitsRequest)) -> SampleLogitsRequest {
    let mut r = ok();
    f(&mut r);
    r
}

/// A gRPC message frame: compressed flag, big-endian length, bytes.
fn frame(compressed: bool, body: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(compressed)];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// What came back on one raw HTTP/2 call.
#[derive(Debug, Default)]
struct Raw {
    http_status: u16,
    grpc_status: Option<i32>,
    grpc_message: String,
    /// Data frames' payload (gRPC message frames).
    data: Vec<u8>,
}

impl Raw {
    fn code(&self) -> Code {
        Code::from_i32(self.grpc_status.unwrap_or(-1))
    }

    /// The gRPC message frames of `data`.
    fn messages(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut d = &self.data[..];
        while d.len() >= 5 {
            let n = u32::from_be_bytes(d[1..5].try_into().unwrap()) as usize;
            out.push(d[5..5 + n].to_vec());
            d = &d[5 + n..];
        }
        out
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP/2 request to the server with the given headers and DATA payloads
/// (the stream is ended after the last one).
async fn raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    data: &[&[u8]],
) -> Raw {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (response, mut send) = client.send_request(req.body(()).unwrap(), data.is_empty()).unwrap();
    for (i, d) in data.iter().enumerate() {
        // The server may answer (and close the stream) before reading it all.
        if send.send_data(Bytes::copy_from_slice(d), i + 1 == data.len()).is_err() {
            break;
        }
    }
    let out = read_reply(response).await;
    conn.abort();
    out
}

async fn read_reply(response: h2::client::ResponseFuture) -> Raw {
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("no answer within 30 s")
        .expect("HTTP/2 response");
    let (parts, mut body) = response.into_parts();
    let mut out = Raw { http_status: parts.status.as_u16(), ..Raw::default() };
    let take = |h: &http::HeaderMap, out: &mut Raw| {
        if let Some(s) = h.get("grpc-status") {
            out.grpc_status = s.to_str().ok().and_then(|s| s.parse().ok());
        }
        if let Some(m) = h.get("grpc-message") {
            out.grpc_message = percent_decode(m.to_str().unwrap_or(""));
        }
    };
    take(&parts.headers, &mut out);
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("DATA frame");
        let _ = body.flow_control().release_capacity(chunk.len());
        out.data.extend_from_slice(&chunk);
    }
    if let Some(trailers) = body.trailers().await.expect("trailers") {
        take(&trailers, &mut out);
    }
    out
}

const GRPC: [(&str, &str); 2] = [("content-type", "application/grpc"), ("te", "trailers")];

/// Reads from a raw TCP connection until the server closes it (or 10 s pass).
async fn read_until_closed(mut tcp: TcpStream) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => Ok(buf),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(buf),
        Ok(Err(e)) => Err(format!("read error {e}")),
        Err(_) => Err("the server kept the connection open for 10 s".into()),
    }
}

/// Calls with one request over and over and checks every answer against the
/// one it got alone before the corpus; counts answers and mismatches.
struct Canary {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Canary {
    async fn start(server: &Server) -> Canary {
        let mut c = server.client().await;
        let req = request(vec![seq(&[5, 6, 7, 8, 9], 1, None), seq(&[10, 11], 0, Some(3))], 64, 77);
        let reference = c.sample_logits(req.clone()).await.unwrap().into_inner();
        let (stop, answered) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, a) = (stop.clone(), answered.clone());
        let task = tokio::spawn(async move {
            let mut problems = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match c.sample_logits(req.clone()).await {
                    Ok(r) if same_answer(r.get_ref(), &reference) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => problems.push("a different answer".to_string()),
                    Err(e) => problems.push(format!("{e:?}")),
                }
            }
            problems
        });
        Canary { stop, answered, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let problems = self.task.await.unwrap();
        assert!(problems.is_empty(), "the canary saw: {problems:?}");
        self.answered.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bad_input_corpus_gets_precise_errors_and_never_disturbs_other_clients() {
    let mut server = start();
    let addr = server.grpc.strip_prefix("http://").unwrap().to_string();
    let canary = Canary::start(&server).await;
    let mut c = server.client().await;
    let mut tried = 0usize;

    // 1. Every validation rule, with values at and past each boundary.
    let long = |n: usize| vec![1u32; n];
    let v = VOCAB;
    let invalid: Vec<(&str, SampleLogitsRequest, &str)> = vec![
        ("no sequences", request(vec![], 16, 1), "request has no sequences"),
        ("only sequence empty", request(vec![seq(&[], 0, None)], 16, 1), "sequence 0 is empty"),
        (
            "second sequence empty",
            request(vec![seq(&[1], 0, None), seq(&[], 0, None)], 16, 1),
            "sequence 1 is empty",
        ),
        (
            "id = vocab",
            request(vec![seq(&[1, v, 2], 0, None)], 16, 1),
            "sequence 0, position 1: token id 96 is outside the vocabulary (vocab_size 96)",
        ),
        (
            "id = vocab + 1000, last position of the second sequence",
            request(vec![seq(&[1], 0, None), seq(&[2, 3, v + 1000], 0, None)], 16, 1),
            "sequence 1, position 2: token id 1096 is outside",
        ),
        (
            "id = u32::MAX",
            request(vec![seq(&[u32::MAX], 0, None)], 16, 1),
            "token id 4294967295 is outside",
        ),
        (
            "length = max + 1",
            request(vec![seq(&long(33), 0, None)], 16, 1),
            "sequence 0 has 33 tokens, more than the max_sequence_length of 32",
        ),
        (
            "length = 100 × max",
            request(vec![seq(&long(3200), 0, None)], 16, 1),
            "sequence 0 has 3200 tokens",
        ),
        (
            "first_position = length",
            request(vec![seq(&[1, 2, 3], 3, None)], 16, 1),
            "sequence 0: first_position 3 must be less than its length 3",
        ),
        (
            "first_position = length + 1 with its own seed",
            request(vec![seq(&[1], 0, None), seq(&[1, 2], 3, Some(9))], 16, 1),
            "sequence 1: first_position 3 must be less than its length 2",
        ),
        (
            "first_position = u32::MAX",
            request(vec![seq(&[1, 2, 3], u32::MAX, None)], 16, 1),
            "first_position 4294967295 must be less than its length 3",
        ),
        (
            "k = max + 1",
            request(vec![seq(&[1], 0, None)], MAX_K + 1, 1),
            "num_samples 513 is more than the max_num_samples of 512",
        ),
        (
            "k = u32::MAX",
            request(vec![seq(&[1], 0, None)], u32::MAX, 1),
            "num_samples 4294967295 is more than",
        ),
        (
            "top-k with k = max + 1",
            with(|r| {
                r.method = SamplingMethod::TopK as i32;
                r.num_samples = MAX_K + 1;
            }),
            "num_samples 513",
        ),
        (
            "temperature 0",
            with(|r| r.temperature = Some(0.0)),
            "temperature 0 must be finite and > 0",
        ),
        ("temperature -0", with(|r| r.temperature = Some(-0.0)), "temperature -0 must be finite"),
        ("temperature -1", with(|r| r.temperature = Some(-1.0)), "temperature -1 must be finite"),
        (
            "temperature NaN",
            with(|r| r.temperature = Some(f32::NAN)),
            "temperature NaN must be finite",
        ),
        (
            "temperature +inf",
            with(|r| r.temperature = Some(f32::INFINITY)),
            "temperature inf must be finite",
        ),
        (
            "temperature -inf",
            with(|r| r.temperature = Some(f32::NEG_INFINITY)),
            "temperature -inf must be finite",
        ),
        ("method 3", with(|r| r.method = 3), "method 3 is not a SamplingMethod"),
        ("method -1", with(|r| r.method = -1), "method -1 is not a SamplingMethod"),
        ("method i32::MAX", with(|r| r.method = i32::MAX), "method 2147483647 is not"),
        (
            "value_encoding 4",
            with(|r| r.value_encoding = 4),
            "value_encoding 4 is not a ValueEncoding",
        ),
        ("value_encoding -2", with(|r| r.value_encoding = -2), "value_encoding -2 is not"),
        (
            "more tokens than the queue holds (65 × 32)",
            request((0..65).map(|_| seq(&long(32), 0, None)).collect(), 16, 1),
            "request has 2080 tokens, more than the server queues at once (2048)",
        ),
        (
            "5000 one-token sequences",
            request((0..5000).map(|_| seq(&[1], 0, None)).collect(), 16, 1),
            "request has 5000 tokens",
        ),
        (
            "the first problem is named: an empty sequence before a bad k",
            request(vec![seq(&[], 0, None)], MAX_K + 1, 1),
            "sequence 0 is empty",
        ),
    ];
    for (what, req, message) in invalid {
        let status = c.sample_logits(req.clone()).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {message:?} not in {status:?}");
        // The same request on a stream: the same status, naming the request.
        let stream = c.sample_logits_stream(futures::stream::iter([req])).await;
        let status = match stream {
            Ok(s) => {
                let mut s = s.into_inner();
                s.message().await.expect_err(what)
            }
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{what} (stream): {status:?}");
        assert!(
            status.message().starts_with("request 0 of the stream: ")
                && status.message().contains(message),
            "{what} (stream): {status:?}"
        );
        tried += 1;
    }

    // 2. Values at the boundaries that are valid get correct answers.
    let k_of = |r: &SampleLogitsResponse, s: usize, p: usize| -> u32 {
        let q = &r.sequences[s];
        let (a, b) = (q.offsets[p] as usize, q.offsets[p + 1] as usize);
        q.counts[a..b].iter().sum()
    };
    let mut last_id = vec![0u32; MAX_LEN as usize];
    last_id[0] = v - 1;
    type Check = Box<dyn Fn(&SampleLogitsResponse)>;
    let valid: Vec<(&str, SampleLogitsRequest, Check)> = vec![
        (
            "length = max, last position only",
            request(vec![seq(&long(32), 31, None)], 16, 1),
            Box::new(|r| assert_eq!(r.sequences[0].offsets.len(), 2)),
        ),
        (
            "id = vocab - 1 everywhere",
            request(vec![seq(&[v - 1; 4], 0, None)], 16, 1),
            Box::new(|r| assert_eq!(r.sequences[0].offsets.len(), 5)),
        ),
        (
            "k = max",
            request(vec![seq(&[1, 2], 0, None)], MAX_K, 1),
            Box::new(move |r| {
                assert_eq!(r.num_samples, MAX_K);
                assert_eq!(k_of(r, 0, 1), MAX_K);
            }),
        ),
        (
            "k = 0 means the default",
            request(vec![seq(&[1, 2], 0, None)], 0, 1),
            Box::new(move |r| assert_eq!(k_of(r, 0, 0), 256)),
        ),
        (
            "k = 1",
            request(vec![seq(&[1, 2], 0, None)], 1, 1),
            Box::new(move |r| assert_eq!(r.sequences[0].token_ids.len(), 2)),
        ),
        (
            "top-k with k = vocab",
            with(|r| {
                r.method = SamplingMethod::TopK as i32;
                r.num_samples = v;
            }),
            Box::new(move |r| assert_eq!(r.sequences[0].token_ids.len(), 3 * v as usize)),
        ),
        (
            "top-k with k = max > vocab: the whole vocabulary",
            with(|r| {
                r.method = SamplingMethod::TopK as i32;
                r.num_samples = MAX_K;
            }),
            Box::new(move |r| assert_eq!(r.sequences[0].token_ids.len(), 3 * v as usize)),
        ),
        (
            "smallest normal temperature: every draw is the argmax",
            with(|r| r.temperature = Some(f32::MIN_POSITIVE)),
            Box::new(|r| {
                assert_eq!(r.sequences[0].token_ids.len(), 3);
                assert!(r.sequences[0].counts.iter().all(|&c| c == 16));
            }),
        ),
        (
            "subnormal temperature",
            with(|r| r.temperature = Some(1e-45)),
            Box::new(|r| assert_eq!(r.sequences[0].token_ids.len(), 3)),
        ),
        (
            "largest temperature",
            with(|r| r.temperature = Some(f32::MAX)),
            Box::new(|r| assert_eq!(r.temperature, f32::MAX)),
        ),
        (
            "first_position = length - 1 with u64::MAX seeds",
            request(vec![seq(&[1, 2, 3], 2, Some(u64::MAX))], 16, u64::MAX),
            Box::new(|r| assert_eq!(r.sequences[0].first_position, 2)),
        ),
        (
            "bf16 values",
            with(|r| r.value_encoding = ValueEncoding::Bf16 as i32),
            Box::new(|r| {
                let q = &r.sequences[0];
                assert_eq!(q.packed_logprobs.len(), 2 * q.token_ids.len());
            }),
        ),
    ];
    for (what, req, check) in valid {
        let r = c.sample_logits(req).await.unwrap_or_else(|e| panic!("{what}: {e:?}")).into_inner();
        check(&r);
        tried += 1;
    }

    // 3. Bytes that are not a valid request, through raw HTTP/2.
    let good = ok().encode_to_vec();
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 3);
    let mut unknown_fields = good.clone();
    unknown_fields.extend_from_slice(&[0xf8, 0x07, 0x01, 0x82, 0x08, 0x02, 0xaa, 0xbb]); // fields 127, 128
    // sequences[0] = { token_ids: packed [0x80] } — a varint cut short.
    let cut_varint = [0x0a, 0x03, 0x0a, 0x01, 0x80];
    let wrong_wire_type = [0x08, 0x01]; // field 1 (sequences, a message) sent as a varint
    let bad_wire_type = [0x0f, 0x00]; // field 1 with wire type 7, which does not exist
    let big = request(vec![seq(&[90_000; 32], 0, None); 1000], 16, 1).encode_to_vec();
    assert!(big.len() > MAX_MESSAGE);
    let mut huge_prefix = vec![0u8];
    huge_prefix.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut short_frame = vec![0u8];
    short_frame.extend_from_slice(&100u32.to_be_bytes());
    short_frame.extend_from_slice(&good[..10.min(good.len())]);
    let gzip =
        [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-encoding", "gzip")];
    let big_meta = "x".repeat(1 << 20);
    type RawCase<'a> =
        (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<Vec<u8>>, Code, &'a str);
    let raw_cases: Vec<RawCase> = vec![
        (
            "random bytes",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &[0xff; 40])],
            Code::Internal,
            "decode",
        ),
        (
            "a request cut short",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &truncated)],
            Code::Internal,
            "decode",
        ),
        (
            "a packed varint cut short",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &cut_varint)],
            Code::Internal,
            "decode",
        ),
        (
            "a field with the wrong wire type",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &wrong_wire_type)],
            Code::Internal,
            "decode",
        ),
        (
            "wire type 7",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &bad_wire_type)],
            Code::Internal,
            "decode",
        ),
        (
            "a frame shorter than its length prefix",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![short_frame],
            Code::Internal,
            "",
        ),
        (
            "a message over --max-message-bytes",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &big)],
            Code::OutOfRange,
            "too large",
        ),
        (
            "a length prefix of 4 GiB",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![huge_prefix],
            Code::OutOfRange,
            "too large",
        ),
        (
            "compressed flag without grpc-encoding",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(true, &good)],
            Code::Internal,
            "compress",
        ),
        (
            "grpc-encoding gzip, which is not enabled",
            "POST",
            PATH,
            gzip.to_vec(),
            vec![frame(true, &good)],
            Code::Unimplemented,
            "gzip",
        ),
        (
            "no message at all",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![],
            Code::Internal,
            "Missing request message",
        ),
        (
            "an unknown method",
            "POST",
            "/logitd.v1.Teacher/Nope",
            GRPC.to_vec(),
            vec![frame(false, &good)],
            Code::Unimplemented,
            "",
        ),
        (
            "an unknown service",
            "POST",
            "/foo.v1.Bar/Baz",
            GRPC.to_vec(),
            vec![frame(false, &good)],
            Code::Unimplemented,
            "",
        ),
        (
            "stream: a good request, then random bytes",
            "POST",
            STREAM_PATH,
            GRPC.to_vec(),
            vec![frame(false, &good), frame(false, &[0xff; 16])],
            Code::Internal,
            "request 1 of the stream: ",
        ),
        (
            "stream: a good request, then a bad k",
            "POST",
            STREAM_PATH,
            GRPC.to_vec(),
            vec![
                frame(false, &good),
                frame(false, &with(|r| r.num_samples = MAX_K + 1).encode_to_vec()),
            ],
            Code::InvalidArgument,
            "request 1 of the stream: num_samples 513",
        ),
        (
            "stream: a good request, then a frame cut short",
            "POST",
            STREAM_PATH,
            GRPC.to_vec(),
            vec![frame(false, &good), frame(false, &good)[..8].to_vec()],
            Code::Internal,
            "",
        ),
    ];
    for (what, method, path, headers, data, code, message) in raw_cases {
        let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let started = Instant::now();
        let r = raw(&addr, method, path, &headers, &slices).await;
        assert_eq!(r.code(), code, "{what}: {r:?}");
        assert!(
            r.grpc_message.contains(message),
            "{what}: {message:?} not in {:?}",
            r.grpc_message
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
        if path == STREAM_PATH {
            // The good request before the bad one was answered first.
            let messages = r.messages();
            assert_eq!(messages.len(), 1, "{what}: {r:?}");
            let first = SampleLogitsResponse::decode(&messages[0][..]).unwrap();
            assert_eq!(first.sequences.len(), 1, "{what}");
        }
        tried += 1;
    }

    // Valid on the wire though unusual: unknown fields are skipped (forward
    // compatibility), and a bad grpc-timeout is ignored.
    for (what, headers, body) in [
        ("unknown fields 127 and 128", GRPC.to_vec(), unknown_fields.clone()),
        (
            "a grpc-timeout that does not parse",
            vec![GRPC[0], GRPC[1], ("grpc-timeout", "soon")],
            good.clone(),
        ),
    ] {
        let r = raw(&addr, "POST", PATH, &headers, &[&frame(false, &body)]).await;
        assert_eq!(r.code(), Code::Ok, "{what}: {r:?}");
        assert_eq!(r.messages().len(), 1, "{what}");
        tried += 1;
    }

    // HTTP-level oddities: no gRPC status is owed, but an HTTP error is.
    let r = raw(&addr, "GET", PATH, &GRPC, &[]).await;
    assert!(r.http_status >= 400 || r.code() != Code::Ok, "GET: {r:?}");
    tried += 1;
    // tonic does not check the content-type: a text/plain call is served.
    let r =
        raw(&addr, "POST", PATH, &[("content-type", "text/plain")], &[&frame(false, &good)]).await;
    assert_eq!(r.code(), Code::Ok, "text/plain: {r:?}");
    tried += 1;
    // A grpc-timeout that has already passed: DEADLINE_EXCEEDED from the
    // service, or CANCELLED "Timeout expired" when tonic's deadline layer
    // (which reads the same header) answers first. Either way, at once.
    let r = raw(
        &addr,
        "POST",
        PATH,
        &[GRPC[0], GRPC[1], ("grpc-timeout", "0m")],
        &[&frame(false, &good)],
    )
    .await;
    assert!(
        (r.code() == Code::DeadlineExceeded && r.grpc_message.contains("deadline"))
            || (r.code() == Code::Cancelled && r.grpc_message == "Timeout expired"),
        "grpc-timeout 0: {r:?}"
    );
    tried += 1;
    // A 1 MiB header is refused by HTTP/2 itself (header list size), not by a crash.
    {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{PATH}"))
            .header("content-type", "application/grpc")
            .header("x-big", big_meta.as_str())
            .body(())
            .unwrap();
        let refused = match client.send_request(req, false) {
            Err(_) => true,
            Ok((response, _send)) => match tokio::time::timeout(Duration::from_secs(10), response)
                .await
                .expect("an answer to a 1 MiB header within 10 s")
            {
                Err(_) => true,
                Ok(r) => r.status().as_u16() >= 400,
            },
        };
        assert!(refused, "a 1 MiB header was accepted");
        conn.abort();
        tried += 1;
    }

    // 4. Not gRPC at all, on the gRPC port.
    let tcp_cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("random bytes", (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(), false),
        ("HTTP/1.1 GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        (
            "HTTP/1.1 POST of a gRPC body",
            [b"POST /logitd.v1.Teacher/SampleLogits HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\ncontent-length: 5\r\n\r\n".as_slice(), &frame(false, &[])].concat(),
            false,
        ),
        ("the HTTP/2 preface, then garbage frames", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &[0xffu8; 64]].concat(), false),
        ("half of the preface, then a half-close", b"PRI * HTTP/2.0\r\n".to_vec(), true),
        ("nothing, then a half-close", vec![], true),
    ];
    for (what, bytes, half_close) in tcp_cases {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        if half_close {
            tcp.shutdown().await.unwrap();
        }
        if let Err(e) = read_until_closed(tcp).await {
            panic!("{what}: {e}");
        }
        tried += 1;
    }
    // 200 connections that send nothing hold no one up.
    let idle: Vec<TcpStream> =
        futures::future::join_all((0..200).map(|_| TcpStream::connect(&addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let started = Instant::now();
    c.sample_logits(ok()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(idle);
    tried += 1;

    // A client that resets its stream mid-call does not disturb anyone.
    {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req =
            http::Request::builder().method("POST").uri(format!("http://{addr}{STREAM_PATH}"));
        let req = GRPC.iter().fold(req, |r, (k, v)| r.header(*k, *v)).body(()).unwrap();
        let (_response, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from(frame(false, &good)), false).unwrap();
        send.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.abort();
        tried += 1;
    }

    let answered = canary.finish().await;
    assert!(answered > 0, "the canary got no answers");
    // The server is alive, never panicked, and counted the refusals.
    assert!(server.child_running(), "the server exited; log:\n{}", server.log());
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    let invalid = server
        .metric(r#"logitd_requests_total{method="SampleLogits",status="INVALID_ARGUMENT"}"#)
        .await
        .unwrap_or(0.0);
    assert!(invalid >= 28.0, "INVALID_ARGUMENT counted {invalid} times");
    println!("bad inputs tried: {tried}; canary answers meanwhile: {answered}, all identical");
    assert!(tried >= 50, "only {tried} cases");
}
