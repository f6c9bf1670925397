//! `logitd-bench` against a real (in-process) server: the requests, positions,
//! distinct ids, bytes and errors it reports are the ones the server's answers
//! imply.

use crate::common;

use std::{path::Path, process::Command};

use logitd_proto::v1::{SampleLogitsRequest, Sequence};
use prost::Message;

fn bench(uri: &str, args: &[&str]) -> serde_json::Value {
    let run = Command::new(env!("CARGO_BIN_EXE_logitd-bench"))
        .args(["--server", uri, "--json", "-"])
        .args(args)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    // The table goes to stderr when the JSON goes to stdout.
    assert!(String::from_utf8_lossy(&run.stderr).contains("throughput"));
    serde_json::from_slice(&run.stdout).expect("one JSON object on stdout")
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn latencies_are_ordered(v: &serde_json::Value) {
    let l = &v["latency_ms"];
    let (p50, p90, p99, max) = (f(l, "p50"), f(l, "p90"), f(l, "p99"), f(l, "max"));
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max, "{l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_reports_what_the_server_answered() {
    let (uri, mut server) = common::tiny_server().await;
    let client = common::connect(&uri, &mut server).await;

    // Three sequences of 9 tokens; the bench cuts them to 6.
    let corpus: Vec<Vec<u32>> =
        (0..3u32).map(|s| (0..9).map(|p| (s * 31 + p * 7) % 96).collect()).collect();
    let dir = std::env::temp_dir().join(format!("logitd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("corpus.jsonl");
    let lines: Vec<String> = corpus.iter().map(|s| serde_json::to_string(s).unwrap()).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let input = input.to_str().unwrap();

    // Unary top-k: every position has exactly k ids, so the bytes are known.
    let unary = bench(
        &uri,
        &[
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--sequences",
            "3",
            "--length",
            "6",
            "--first-position",
            "2",
            "--num-samples",
            "16",
            "--top-k",
            "--input",
            input,
        ],
    );
    assert_eq!(unary["requests_ok"], 6, "{unary}");
    assert_eq!(unary["requests_failed"], 0);
    assert_eq!(unary["errors"], serde_json::json!({}));
    assert_eq!(unary["malformed_responses"], 0);
    assert_eq!(unary["positions"], 6 * 3 * (6 - 2));
    assert_eq!(f(&unary, "distinct_ids_per_position"), 16.0);
    // The server's id: the directory name, "@" and 12 hex digits of the weights' digest.
    let id = unary["model_id"].as_str().expect("model_id");
    let digest = id.strip_prefix("llama@").unwrap_or_else(|| panic!("model_id {id:?}"));
    assert!(digest.len() == 12 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
    latencies_are_ordered(&unary);
    assert!(f(&unary, "positions_per_s") > 0.0);
    // The same request sent here: its encoded size (+ the 5-byte gRPC header)
    // per position; only the echoed seed's varint length may differ.
    let reply = client
        .sample(SampleLogitsRequest {
            sequences: corpus
                .iter()
                .map(|s| Sequence {
                    token_ids: s[..6].to_vec(),
                    first_position: 2,
                    ..Default::default()
                })
                .collect(),
            num_samples: 16,
            temperature: None,
            seed: Some(u64::MAX),
            method: 2,
            value_encoding: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let want = (reply.encoded_len() + 5) as f64 / 12.0;
    let got = f(&unary, "bytes_per_position");
    assert!((got - want).abs() <= 10.0 / 12.0, "{got} bytes/position, expected about {want}");

    // Streaming, sampled, synthetic token ids.
    let stream = bench(
        &uri,
        &[
            "--mode",
            "stream",
            "--depth",
            "3",
            "--concurrency",
            "2",
            "--requests",
            "10",
            "--sequences",
            "2",
            "--length",
            "5",
            "--num-samples",
            "32",
        ],
    );
    assert_eq!(stream["requests_ok"], 10, "{stream}");
    assert_eq!(stream["requests_failed"], 0);
    assert_eq!(stream["positions"], 10 * 2 * 5);
    let ids = f(&stream, "distinct_ids_per_position");
    assert!((1.0..=32.0).contains(&ids), "{ids}");
    latencies_are_ordered(&stream);

    // A duration instead of a count, after warm-up requests that are not counted.
    let timed = bench(
        &uri,
        &["--duration-s", "0.5", "--warmup-requests", "3", "--sequences", "1", "--length", "4"],
    );
    let ok = timed["requests_ok"].as_u64().unwrap();
    assert!(ok >= 1, "{timed}");
    assert_eq!(timed["positions"].as_u64().unwrap(), ok * 4);
    assert!(f(&timed, "elapsed_s") >= 0.5);

    // Refused requests are counted by status, never retried.
    let refused = bench(&uri, &["--requests", "4", "--num-samples", "100000", "--length", "3"]);
    assert_eq!(refused["requests_ok"], 0, "{refused}");
    assert_eq!(refused["requests_failed"], 4);
    assert_eq!(refused["errors"], serde_json::json!({"INVALID_ARGUMENT": 4}));
    assert_eq!(refused["positions"], 0);

    server.abort();
    std::fs::remove_dir_all(Path::new(&dir)).unwrap();
}
