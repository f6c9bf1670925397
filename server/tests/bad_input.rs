//! The bad-input corpus: malformed requests of every kind sent to a real
//! `logitd serve` process, each of which must get the right gRPC status and a
//! message naming the problem, while a canary client keeps calling and must
//! get exactly the answer it got before the corpus started.
//!
//! The expected codes come from the gRPC specification
//! (doc/statuscodes.md, doc/compression.md) and from the validation rules in
//! docs/reference/errors.md, not from the server's output. Where tonic or prost pick
//! the code and message themselves (undecodable bytes: INTERNAL, like grpc-go
//! and grpc-java; an over-limit message: OUT_OF_RANGE; a passed grpc-timeout:
//! CANCELLED "Timeout expired" when tonic's own deadline layer answers first)
//! the test pins their text and docs/reference/errors.md says so. Unknown services and
//! methods get UNIMPLEMENTED naming the path (tonic alone sends no message).
//!
//! Counted separately and asserted exactly (docs/reference/reliability.md quotes the counts):
//! RULES validation rules broken, MALFORMED malformed calls, VALID valid
//! boundary inputs, CONNECTIONS connection-level cases.

use crate::common;

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
const MAX_CANDIDATES: u32 = 8;

/// `tokens` from `first`, with candidate offsets and ids.
fn cand(tokens: &[u32], first: u32, offsets: &[u32], ids: &[u32]) -> logitd_proto::v1::Sequence {
    let mut s = seq(tokens, first, None);
    s.candidate_offsets = offsets.to_vec();
    s.candidate_ids = ids.to_vec();
    s
}
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
            "--max-candidates",
            &MAX_CANDIDATES.to_string(),
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

#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bad_input_corpus_gets_precise_errors_and_never_disturbs_other_clients() {
    let mut server = start();
    let addr = server.grpc.strip_prefix("http://").unwrap().to_string();
    let canary = Canary::start(&server).await;
    let mut c = server.client().await;
    // What the test checks, counted by kind; asserted exactly at the end
    // (docs/reference/reliability.md quotes these numbers).
    let mut rules = 0usize; // validation rules broken (each sent unary and on a stream)
    let mut malformed = 0usize; // malformed calls, each with its status and message
    let mut served = 0usize; // valid boundary inputs, each answered correctly
    let mut connections = 0usize; // connection-level abuse (no gRPC exchange)

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
        ("method 4", with(|r| r.method = 4), "method 4 is not a SamplingMethod"),
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
            "candidate id = vocab at the last position",
            request(vec![cand(&[1, 2, 3], 0, &[0, 1, 1, 2], &[5, v])], 16, 1),
            "sequence 0, position 2: candidate id 96 is outside the vocabulary (vocab_size 96)",
        ),
        (
            "max_candidates + 1 candidates for one position of the second sequence",
            request(vec![seq(&[1], 0, None), cand(&[1, 2], 1, &[0, 9], &[1; 9])], 16, 1),
            "sequence 1, position 1: 9 candidate ids, more than the max_candidates of 8",
        ),
        (
            "candidate offsets for positions that are not returned",
            request(vec![cand(&[1, 2, 3], 2, &[0, 1, 1, 1], &[4])], 16, 1),
            "sequence 0: candidate_offsets has 4 entries; it must be empty or have one entry per returned position plus one (2)",
        ),
        (
            "candidate offsets that start past 0",
            request(vec![cand(&[1, 2, 3], 0, &[1, 1, 1, 1], &[4])], 16, 1),
            "sequence 0: candidate_offsets starts at 1",
        ),
        (
            "candidate offsets that decrease",
            request(vec![cand(&[1, 2, 3], 0, &[0, 2, 1, 2], &[4, 5])], 16, 1),
            "sequence 0: candidate_offsets decreases at entry 2 (1 after 2)",
        ),
        (
            "candidate offsets that do not add up to the ids",
            request(vec![cand(&[1, 2, 3], 0, &[0, 1, 1, 1], &[4, 5])], 16, 1),
            "sequence 0: candidate_offsets ends at 1; it must be empty or have one entry per returned position plus one (4), start at 0, never decrease and end at the 2 candidate_ids",
        ),
        (
            "candidate ids without offsets",
            request(vec![cand(&[1, 2, 3], 0, &[], &[4, 5])], 16, 1),
            "sequence 0: 2 candidate_ids but no candidate_offsets",
        ),
        (
            "candidate id u32::MAX",
            request(vec![cand(&[1, 2], 0, &[0, 0, 1], &[u32::MAX])], 16, 1),
            "sequence 0, position 1: candidate id 4294967295 is outside",
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
        rules += 1;
        malformed += 2;
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
            "max_candidates candidates of id vocab - 1, and the realised tokens",
            with(|r| {
                r.sequences = vec![cand(&[1, 2, 3], 1, &[0, 8, 8], &[v - 1; 8])];
                r.return_token_logprobs = true;
            }),
            Box::new(|r| {
                let q = &r.sequences[0];
                assert_eq!(q.candidate_offsets, [0, 8, 8]);
                assert_eq!(q.candidate_logprobs.len(), 8);
                assert!(q.candidate_logprobs.iter().all(|&l| l == q.candidate_logprobs[0]));
                assert_eq!((q.token_logprobs.len(), q.token_ranks.len()), (1, 1));
            }),
        ),
        (
            "realised tokens of a one-token sequence: none",
            with(|r| {
                r.sequences = vec![seq(&[7], 0, None)];
                r.return_token_logprobs = true;
            }),
            Box::new(|r| {
                assert!(r.sequences[0].token_logprobs.is_empty());
                assert_eq!(r.sequences[0].lse.len(), 1);
            }),
        ),
        (
            "scoring alone (method none)",
            with(|r| {
                r.method = SamplingMethod::None as i32;
                r.return_token_logprobs = true;
            }),
            Box::new(|r| {
                let q = &r.sequences[0];
                assert_eq!(r.num_samples, 0);
                assert!(q.token_ids.is_empty() && q.counts.is_empty());
                assert_eq!(q.offsets, [0, 0, 0, 0]);
                assert_eq!(q.token_logprobs.len(), 2);
            }),
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
        served += 1;
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
    let big_message = format!(
        "decoded message length too large: found {} bytes, the limit is: {MAX_MESSAGE} bytes",
        big.len()
    );
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
            "failed to decode Protobuf message: invalid varint",
        ),
        (
            "a request cut short",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &truncated)],
            Code::Internal,
            "failed to decode Protobuf message: SampleLogitsRequest.num_samples: invalid varint",
        ),
        (
            "a packed varint cut short",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &cut_varint)],
            Code::Internal,
            "failed to decode Protobuf message: Sequence.token_ids: SampleLogitsRequest.sequences: invalid varint",
        ),
        (
            "a field with the wrong wire type",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &wrong_wire_type)],
            Code::Internal,
            "failed to decode Protobuf message: SampleLogitsRequest.sequences: invalid wire type: Varint (expected LengthDelimited)",
        ),
        (
            "wire type 7",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &bad_wire_type)],
            Code::Internal,
            "failed to decode Protobuf message: invalid wire type value: 7",
        ),
        (
            "a frame shorter than its length prefix",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![short_frame],
            Code::Internal,
            "Unexpected EOF decoding stream.",
        ),
        (
            "a message over --max-message-bytes",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(false, &big)],
            Code::OutOfRange,
            &big_message,
        ),
        (
            "a length prefix of 4 GiB",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![huge_prefix],
            Code::OutOfRange,
            "decoded message length too large: found 4294967295 bytes, the limit is: 65536 bytes",
        ),
        (
            "compressed flag without grpc-encoding",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![frame(true, &good)],
            Code::Internal,
            "received message with compressed-flag but no grpc-encoding was specified",
        ),
        (
            "grpc-encoding gzip, which is not enabled",
            "POST",
            PATH,
            gzip.to_vec(),
            vec![frame(true, &good)],
            Code::Unimplemented,
            "Content is compressed with `gzip` which isn't supported",
        ),
        (
            "no message at all",
            "POST",
            PATH,
            GRPC.to_vec(),
            vec![],
            Code::Internal,
            "Missing request message.",
        ),
        (
            "an unknown method",
            "POST",
            "/logitd.v1.Teacher/Nope",
            GRPC.to_vec(),
            vec![frame(false, &good)],
            Code::Unimplemented,
            "unknown method /logitd.v1.Teacher/Nope",
        ),
        (
            "an unknown service",
            "POST",
            "/foo.v1.Bar/Baz",
            GRPC.to_vec(),
            vec![frame(false, &good)],
            Code::Unimplemented,
            "unknown method /foo.v1.Bar/Baz",
        ),
        (
            "stream: a good request, then random bytes",
            "POST",
            STREAM_PATH,
            GRPC.to_vec(),
            vec![frame(false, &good), frame(false, &[0xff; 16])],
            Code::Internal,
            "request 1 of the stream: failed to decode Protobuf message: invalid varint",
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
            "request 1 of the stream: num_samples 513 is more than the max_num_samples of 512",
        ),
        (
            "stream: a good request, then a frame cut short",
            "POST",
            STREAM_PATH,
            GRPC.to_vec(),
            vec![frame(false, &good), frame(false, &good)[..8].to_vec()],
            Code::Internal,
            "request 1 of the stream: Unexpected EOF decoding stream.",
        ),
    ];
    // Every call first, then the checks, so a failure shows all the answers.
    let mut answers = vec![];
    for (what, method, path, headers, data, code, message) in raw_cases {
        let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let started = Instant::now();
        let r = raw(&addr, method, path, &headers, &slices).await;
        println!("{what}: {:?} {:?} (HTTP {})", r.code(), r.grpc_message, r.http_status);
        answers.push((what, path, code, message, started.elapsed(), r));
    }
    for (what, path, code, message, took, r) in answers {
        assert_eq!(r.code(), code, "{what}: {r:?}");
        assert!(!message.is_empty(), "{what}: every case names its expected message");
        assert!(
            r.grpc_message.contains(message),
            "{what}: {message:?} not in {:?}",
            r.grpc_message
        );
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        if path == STREAM_PATH {
            // The good request before the bad one was answered first.
            let messages = r.messages();
            assert_eq!(messages.len(), 1, "{what}: {r:?}");
            let first = SampleLogitsResponse::decode(&messages[0][..]).unwrap();
            assert_eq!(first.sequences.len(), 1, "{what}");
        } else {
            assert!(r.messages().is_empty(), "{what}: {r:?}");
        }
        malformed += 1;
    }

    // Valid on the wire though unusual: unknown fields are skipped (forward
    // compatibility), a grpc-timeout that does not parse is ignored, and tonic
    // does not check the content-type (a text/plain call is served).
    for (what, headers, body) in [
        ("unknown fields 127 and 128", GRPC.to_vec(), unknown_fields.clone()),
        (
            "a grpc-timeout that does not parse",
            vec![GRPC[0], GRPC[1], ("grpc-timeout", "soon")],
            good.clone(),
        ),
        ("content-type text/plain", vec![("content-type", "text/plain")], good.clone()),
    ] {
        let r = raw(&addr, "POST", PATH, &headers, &[&frame(false, &body)]).await;
        assert_eq!(r.code(), Code::Ok, "{what}: {r:?}");
        let messages = r.messages();
        assert_eq!(messages.len(), 1, "{what}");
        let reply = SampleLogitsResponse::decode(&messages[0][..]).unwrap();
        assert_eq!(reply.sequences.len(), 1, "{what}");
        assert_eq!(reply.sequences[0].lse.len(), 3, "{what}");
        served += 1;
    }

    // A GET without a body: tonic does not check the HTTP method (gRPC is
    // POST only), so it is a call without a message.
    let r = raw(&addr, "GET", PATH, &GRPC, &[]).await;
    println!("GET: {r:?}");
    assert_eq!((r.code(), r.grpc_message.as_str()), (Code::Internal, "Missing request message."));
    malformed += 1;
    // A grpc-timeout that has already passed: DEADLINE_EXCEEDED from the
    // service, or CANCELLED "Timeout expired" when tonic's deadline layer
    // (which reads the same header) answers first. Either way, at once. Sent
    // 20 times: the service's answer raced between DEADLINE_EXCEEDED and
    // UNAVAILABLE "the engine stopped before answering" (a status clients
    // retry) when the batcher dropped the expired item first; fixed.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let r = raw(
            &addr,
            "POST",
            PATH,
            &[GRPC[0], GRPC[1], ("grpc-timeout", "0m")],
            &[&frame(false, &good)],
        )
        .await;
        assert!(
            (r.code() == Code::DeadlineExceeded
                && r.grpc_message
                    == "the deadline (0 ms after the request arrived) passed before the answer was ready")
                || (r.code() == Code::Cancelled && r.grpc_message == "Timeout expired"),
            "grpc-timeout 0: {r:?}"
        );
        *seen.entry(format!("{:?}", r.code())).or_insert(0) += 1;
    }
    println!("grpc-timeout 0, 20 times: {seen:?}");
    malformed += 1;
    // A 1 MiB header, written frame by frame by hand (an HTTP/2 client
    // library may refuse or cut it itself): the server reads the header block
    // and, past its 16 KiB header list limit, refuses it with GOAWAY
    // ENHANCE_YOUR_CALM "too_many_continuations" (h2's guard against a
    // CONTINUATION flood) before any stream is opened (last stream id 0).
    {
        let goaway = oversized_header(&addr, &big_meta).await;
        println!("1 MiB header: {goaway:?}");
        assert_eq!(goaway, (0, 0xb, "too_many_continuations".to_string()), "1 MiB header");
        malformed += 1;
    }

    // 4. Not gRPC at all, on the gRPC port. The server sends its SETTINGS
    // (it speaks first in HTTP/2) and closes the connection within 10 s; to
    // HTTP/2 frames with an impossible length it first answers GOAWAY
    // FRAME_SIZE_ERROR (6). Nothing else comes back.
    type TcpCase = (&'static str, Vec<u8>, bool, Option<u32>);
    let tcp_cases: Vec<TcpCase> = vec![
        (
            "random bytes",
            (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
            false,
            None,
        ),
        ("HTTP/1.1 GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false, None),
        (
            "HTTP/1.1 POST of a gRPC body",
            [
                b"POST /logitd.v1.Teacher/SampleLogits HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\ncontent-length: 5\r\n\r\n".as_slice(),
                &frame(false, &[]),
            ]
            .concat(),
            false,
            None,
        ),
        (
            "the HTTP/2 preface, then garbage frames",
            [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &[0xffu8; 64]].concat(),
            false,
            Some(6),
        ),
        ("half of the preface, then a half-close", b"PRI * HTTP/2.0\r\n".to_vec(), true, None),
        ("nothing, then a half-close", vec![], true, None),
    ];
    for (what, bytes, half_close, goaway) in tcp_cases {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        if half_close {
            tcp.shutdown().await.unwrap();
        }
        let reply = read_until_closed(tcp).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = frames(&reply);
        println!("{what}: the server sent {got:?} and closed");
        let mut want = vec![Frame::Settings];
        want.extend(goaway.map(Frame::GoAway));
        assert_eq!(got, want, "{what}");
        connections += 1;
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
    connections += 1;

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
        connections += 1;
    }

    let answered = canary.finish().await;
    assert!(answered > 0, "the canary got no answers");
    // The server is alive, never panicked, and counted the refusals: every
    // broken rule once as a unary call, and once on a stream (plus the bad k
    // sent after a good request on a raw stream).
    assert!(server.child_running(), "the server exited; log:\n{}", server.log());
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    let text = server.metrics_text().await;
    let count = |series: &str| {
        common::metric_in(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let unary = count(r#"logitd_requests_total{method="SampleLogits",status="INVALID_ARGUMENT"}"#);
    assert_eq!(unary, RULES as f64, "{text}");
    let stream =
        count(r#"logitd_requests_total{method="SampleLogitsStream",status="INVALID_ARGUMENT"}"#);
    assert_eq!(stream, RULES as f64 + 1.0, "{text}");
    println!(
        "bad input: {rules} validation rules broken (each unary and on a stream), {malformed} \
         malformed calls answered with their status and message, {served} valid boundary \
         inputs answered correctly, {connections} connection-level abuses; canary answers \
         meanwhile: {answered}, all identical"
    );
    assert_eq!(
        (rules, malformed, served, connections),
        (RULES, MALFORMED, VALID, CONNECTIONS),
        "docs/reference/reliability.md quotes these counts"
    );
}

/// An HPACK string literal (no Huffman coding).
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// An HPACK integer with an `n`-bit prefix, after the `first` flag bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Opens an HTTP/2 connection and sends a SampleLogits request whose header
/// block carries `x-big: VALUE`, as one HEADERS frame and CONTINUATION frames
/// of 16 KiB; returns the GOAWAY the server answers with: (last stream id,
/// error code, debug data). Fails when the server closes without one.
async fn oversized_header(addr: &str, value: &str) -> (u32, u32, String) {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    hpack_int(&mut block, 0, 4, 4); // :path, literal without indexing
    hpack_string(&mut block, PATH.as_bytes());
    hpack_int(&mut block, 0, 4, 1); // :authority
    hpack_string(&mut block, addr.as_bytes());
    hpack_int(&mut block, 0, 4, 31); // content-type
    hpack_string(&mut block, b"application/grpc");
    for (k, v) in [(&b"te"[..], &b"trailers"[..]), (b"x-big", value.as_bytes())] {
        block.push(0); // literal, new name
        hpack_string(&mut block, k);
        hpack_string(&mut block, v);
    }
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend(h2_frame(4, 0, 0, &[])); // SETTINGS
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let end_headers = if i + 1 == chunks.len() { 0x4 } else { 0 };
        let (kind, flags) = if i == 0 { (1, 0x1 | end_headers) } else { (9, end_headers) };
        wire.extend(h2_frame(kind, flags, 1, chunk));
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // Written while the answer is read: the server may close before the end.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&wire).await;
        wr
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let goaway = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            got.extend_from_slice(&buf[..n]);
            let mut d = &got[..];
            while d.len() >= 9 {
                let len = u32::from_be_bytes([0, d[0], d[1], d[2]]) as usize;
                if d.len() < 9 + len {
                    break;
                }
                let payload = &d[9..9 + len];
                if d[3] == 7 && len >= 8 {
                    return Some((
                        u32::from_be_bytes(payload[0..4].try_into().unwrap()) & 0x7fff_ffff,
                        u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                        String::from_utf8_lossy(&payload[8..]).into_owned(),
                    ));
                }
                d = &d[9 + len..];
            }
        }
    })
    .await
    .expect("an answer to a 1 MiB header within 10 s");
    writer.abort();
    goaway
        .unwrap_or_else(|| panic!("the server closed without a GOAWAY; it sent {:?}", frames(&got)))
}

/// Validation rules broken, each in one request sent unary and on a stream.
const RULES: usize = 36;
/// Malformed calls: the RULES requests twice, 16 raw HTTP/2 calls (undecodable
/// or over-limit bytes, bad compression, unknown methods, bad data mid-stream),
/// a GET, a passed grpc-timeout, a 1 MiB header.
const MALFORMED: usize = 2 * RULES + 16 + 3;
/// Valid inputs at the boundaries: 15 requests at the limits, unknown fields,
/// an unparseable grpc-timeout, a text/plain content-type.
const VALID: usize = 15 + 3;
/// Connection-level abuse: 6 raw byte streams, 200 idle connections, a reset stream.
const CONNECTIONS: usize = 6 + 1 + 1;

/// An HTTP/2 frame the server sent, as far as the tests look at it.
#[derive(Debug, PartialEq)]
enum Frame {
    /// SETTINGS (not an ACK) on stream 0.
    Settings,
    /// GOAWAY with this error code.
    GoAway(u32),
    /// Any other frame: type, flags, stream, length.
    Other(u8, u8, u32, usize),
    /// Bytes that are not a whole frame.
    Rest(Vec<u8>),
}

/// The HTTP/2 frames in `bytes`.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut out = vec![];
    let mut d = bytes;
    while d.len() >= 9 {
        let len = u32::from_be_bytes([0, d[0], d[1], d[2]]) as usize;
        let (kind, flags) = (d[3], d[4]);
        let stream = u32::from_be_bytes(d[5..9].try_into().unwrap()) & 0x7fff_ffff;
        if d.len() < 9 + len {
            break;
        }
        let payload = &d[9..9 + len];
        out.push(match kind {
            4 if flags == 0 && stream == 0 => Frame::Settings,
            7 if len >= 8 => Frame::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            _ => Frame::Other(kind, flags, stream, len),
        });
        d = &d[9 + len..];
    }
    if !d.is_empty() {
        out.push(Frame::Rest(d.to_vec()));
    }
    out
}
