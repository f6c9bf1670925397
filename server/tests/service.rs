//! The gRPC service through a real server process and a real client.

mod common;

use std::time::Duration;

use common::{Server, request, seq, tiny};
use futures::StreamExt;
use logitd_proto::v1::{SampleLogitsRequest, SampleLogitsResponse};
use tonic::Code;

fn same_samples(a: &SampleLogitsResponse, b: &SampleLogitsResponse) {
    assert_eq!(a.sequences.len(), b.sequences.len());
    for (x, y) in a.sequences.iter().zip(&b.sequences) {
        assert_eq!(x.offsets, y.offsets);
        assert_eq!(x.token_ids, y.token_ids);
        assert_eq!(x.counts, y.counts);
        for (p, q) in x.logprobs.iter().zip(&y.logprobs).chain(x.lse.iter().zip(&y.lse)) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}

fn body(i: u32) -> Vec<u32> {
    (0..(3 + i % 11)).map(|p| (i * 31 + p * 7) % 96).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_get_what_they_get_alone() {
    let server = Server::start(&tiny("llama"), &["--max-wait-ms", "20"]);
    let client = server.client().await;
    let make = |i: u32| {
        request(
            vec![seq(&body(i), i % 3, None), seq(&body(i + 100), 0, Some(i as u64))],
            64,
            1000 + i as u64,
        )
    };
    // 24 callers at once: the server batches them together.
    let tasks: Vec<_> = (0..24u32)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { c.sample_logits(make(i)).await.unwrap().into_inner() })
        })
        .collect();
    let together: Vec<SampleLogitsResponse> =
        futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    let batches = server.metric("logitd_batch_sequences_count").await.unwrap();
    assert!(batches < 48.0, "requests were batched together ({batches} batches for 48 sequences)");
    for (i, got) in together.iter().enumerate() {
        let i = i as u32;
        let alone = client.clone().sample_logits(make(i)).await.unwrap().into_inner();
        same_samples(got, &alone);
        assert_eq!(got.seed, 1000 + i as u64);
        let s = &got.sequences[0];
        assert_eq!(s.first_position, i % 3);
        assert_eq!(s.offsets.len(), body(i).len() - (i % 3) as usize + 1);
        for w in s.offsets.windows(2) {
            let counts = &s.counts[w[0] as usize..w[1] as usize];
            assert_eq!(counts.iter().sum::<u32>(), 64);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_answers_in_order() {
    let server = Server::start(&tiny("gemma2"), &[]);
    let mut client = server.client().await;
    let requests: Vec<SampleLogitsRequest> =
        (0..30u32).map(|i| request(vec![seq(&body(i), 0, None)], 8, i as u64)).collect();
    let outbound = futures::stream::iter(requests.clone());
    let mut inbound = client.sample_logits_stream(outbound).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(reply) = inbound.next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.seed, n as u64, "answers come in request order");
        assert_eq!(reply.sequences[0].lse.len(), body(n).len());
        // Same as the unary answer.
        let unary = client.sample_logits(requests[n as usize].clone()).await.unwrap().into_inner();
        same_samples(&reply, &unary);
        n += 1;
    }
    assert_eq!(n, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_resource_exhausted_at_once() {
    // The first request waits up to 3 s for a fuller batch and fills the queue.
    let server = Server::start(
        &tiny("llama"),
        &["--max-queue-tokens", "40", "--max-wait-ms", "3000", "--max-sequence-length", "32"],
    );
    let client = server.client().await;
    let mut first = client.clone();
    let waiting = tokio::spawn(async move {
        first.sample_logits(request(vec![seq(&[1; 30], 0, None)], 4, 1)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let status = client
        .clone()
        .sample_logits(request(vec![seq(&[2; 20], 0, None)], 4, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("30 tokens are queued and this request adds 20, over the limit of 40"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not after a wait");
    // A request larger than the whole queue can never fit: that is the client's error.
    let status = client
        .clone()
        .sample_logits(request(vec![seq(&[1; 30], 0, None), seq(&[1; 30], 0, None)], 4, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("request has 60 tokens"), "{}", status.message());
    waiting.await.unwrap().expect("the queued request is still answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_calls_queued_work_is_dropped() {
    let server = Server::start(&tiny("llama"), &["--max-wait-ms", "1500"]);
    let client = server.client().await;
    // The caller goes away (no deadline) while the sequence waits in the queue.
    let mut c = client.clone();
    let call = tokio::spawn(async move {
        c.sample_logits(request(vec![seq(&[1, 2, 3, 4], 0, None)], 4, 1)).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let cancelled =
        server.metric("logitd_dropped_total{reason=\"cancelled\"}").await.unwrap_or(0.0);
    assert_eq!(cancelled, 1.0, "{}", server.metrics_text().await);
    // Only the warm-up ran through the engine.
    assert_eq!(server.metric("logitd_tokens_total").await.unwrap_or(0.0), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_drop_queued_work() {
    let server =
        Server::start(&tiny("llama"), &["--max-wait-ms", "2500", "--request-timeout-s", "1"]);
    let client = server.client().await;
    // The client's deadline (grpc-timeout) passes while the sequence waits.
    let mut req = tonic::Request::new(request(vec![seq(&[1, 2, 3, 4], 0, None)], 4, 1));
    req.set_timeout(Duration::from_millis(200));
    let status = client.clone().sample_logits(req).await.unwrap_err();
    assert!(matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded), "{status:?}");
    // No client deadline: the server's --request-timeout-s applies, and the
    // service answers DEADLINE_EXCEEDED itself.
    let started = std::time::Instant::now();
    let status =
        client.clone().sample_logits(request(vec![seq(&[5, 6], 0, None)], 4, 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline (1000 ms"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_millis(2400), "answered after the batch ran");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let expired =
        server.metric("logitd_dropped_total{reason=\"deadline_exceeded\"}").await.unwrap_or(0.0);
    assert_eq!(expired, 2.0, "{}", server.metrics_text().await);
    assert_eq!(server.metric("logitd_tokens_total").await.unwrap_or(0.0), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_known_traffic() {
    let server = Server::start(&tiny("mistral"), &[]);
    let mut c = server.client().await;
    for i in 0..3 {
        c.sample_logits(request(vec![seq(&[1, 2, 3, 4, 5], 2, None)], 16, i)).await.unwrap();
    }
    c.sample_logits(request(vec![], 16, 0)).await.unwrap_err();
    let text = server.metrics_text().await;
    let get = |s: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(s)
                .and_then(|v| v.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
    };
    assert_eq!(
        get("logitd_requests_total{method=\"SampleLogits\",status=\"OK\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        get("logitd_requests_total{method=\"SampleLogits\",status=\"INVALID_ARGUMENT\"}"),
        Some(1.0)
    );
    assert_eq!(get("logitd_tokens_total"), Some(15.0));
    assert_eq!(
        get("logitd_sampled_unique_ids_count"),
        Some(9.0),
        "3 requests × 3 returned positions"
    );
    assert_eq!(get("logitd_teacher_mass_covered_ratio_count"), Some(9.0));
    assert!(get("logitd_response_bytes_total").unwrap() > 0.0);
    assert!(get("logitd_request_duration_seconds_count{method=\"SampleLogits\"}").unwrap() >= 4.0);
    assert_eq!(get("logitd_queue_tokens"), Some(0.0));
    assert!(text.contains("logitd_model_info{model_id=\"mistral\",architecture=\"mistral\",dtype=\"f32\",device=\"cpu\",vocab_size=\"96\"} 1"));
    // promtool (Prometheus' own linter) accepts the exposition.
    let dir = std::env::temp_dir().join(format!("logitd-metrics-{}", std::process::id()));
    std::fs::write(&dir, &text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&dir).unwrap())
        .output()
        .expect("promtool is installed (apt package prometheus; .ci/run installs it)");
    std::fs::remove_file(&dir).unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_queued_work_then_exits_zero() {
    // A real teacher, so the work in flight lasts long enough to watch the drain.
    let mut server = Server::start(&cached("SmolLM2-135M-Instruct.Q4_1.gguf"), &[]);
    let client = server.client().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(server.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let check = tonic_health::pb::HealthCheckRequest { service: "logitd.v1.Teacher".into() };
    assert_eq!(health.check(check.clone()).await.unwrap().into_inner().status, 1, "SERVING");
    let mut inflight = client.clone();
    let long: Vec<u32> = (0..600).map(|i| (i * 7919) % 49_152).collect();
    let queued = tokio::spawn(async move {
        inflight.sample_logits(request(vec![seq(&long, 0, None)], 8, 3)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // While draining: NOT_SERVING, and new work is refused.
    assert_eq!(
        health.check(check).await.unwrap().into_inner().status,
        2,
        "NOT_SERVING while draining"
    );
    let refused =
        client.clone().sample_logits(request(vec![seq(&[1], 0, None)], 8, 3)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let answer = queued.await.unwrap().expect("the queued request completes during the drain");
    assert_eq!(answer.into_inner().sequences[0].lse.len(), 600);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}; log: {}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_is_not_serving_until_the_model_is_loaded() {
    // Gemma 3 270M (1 GB in f32) takes long enough to load to be observed.
    let gemma = cached("gemma-3-270m-q4_k_m.gguf");
    let server = Server::start(&gemma, &[]);
    let channel = loop {
        if let Ok(c) =
            tonic::transport::Channel::from_shared(server.grpc.clone()).unwrap().connect().await
        {
            break c;
        }
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut teacher = logitd_proto::v1::teacher_client::TeacherClient::new(channel);
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let first = health.check(check.clone()).await.unwrap().into_inner().status;
    assert_eq!(first, 2, "NOT_SERVING right after start");
    let early = teacher.get_model_info(logitd_proto::v1::GetModelInfoRequest {}).await.unwrap_err();
    assert_eq!(early.code(), Code::Unavailable);
    assert!(early.message().contains("still loading"));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while health.check(check.clone()).await.unwrap().into_inner().status != 1 {
        assert!(std::time::Instant::now() < deadline, "never became SERVING: {}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = teacher
        .get_model_info(logitd_proto::v1::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.vocab_size, 262_144);
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(info.tokenizer_sha256.len(), 64);
}

/// A real teacher fetched by tests/fetch-teachers.sh.
fn cached(file: &str) -> std::path::PathBuf {
    let p = logitd::server::cache_dir().join("teachers").join(file);
    assert!(p.exists(), "{} missing: run tests/fetch-teachers.sh all", p.display());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_batch_fails_only_its_requests_and_the_server_keeps_serving() {
    let server = Server::start(&tiny("llama"), &["--inject-engine-fault", "2"]);
    let mut c = server.client().await;
    let req = || request(vec![seq(&[1, 2, 3], 0, None)], 8, 5);
    let first = c.sample_logits(req()).await.unwrap().into_inner();
    let status = c.sample_logits(req()).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("injected device fault on batch 2"), "{}", status.message());
    let third = c.sample_logits(req()).await.unwrap().into_inner();
    same_samples(&first, &third);
    assert_eq!(
        server.metric("logitd_requests_total{method=\"SampleLogits\",status=\"INTERNAL\"}").await,
        Some(1.0)
    );
}
