//! Metric names (Prometheus conventions: `logitd_` prefix, unit suffixes),
//! their descriptions and histogram buckets, set once; and the exporter.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Calls answered, by `method` and gRPC `status` (the error type label).
pub const REQUESTS: &str = "logitd_requests_total";
/// Failed calls, by `method`, gRPC `status` and `error_type` (what went
/// wrong, finer than the status: `validation`, `overloaded`, `shutting_down`,
/// `deadline_exceeded`, `engine_stopped`, `injected_fault`, `sampler`,
/// `device`, `model`, `not_ready`, `too_many_calls`, `stream_read`).
pub const ERRORS: &str = "logitd_errors_total";
/// Wall time of a call, by `method`.
pub const REQUEST_DURATION: &str = "logitd_request_duration_seconds";
/// Time a sequence waited in the queue.
pub const QUEUE_DURATION: &str = "logitd_queue_duration_seconds";
/// Tokens waiting in the queue (gauge).
pub const QUEUE_TOKENS: &str = "logitd_queue_tokens";
/// Queue capacity in tokens (gauge), for saturation alerts.
pub const QUEUE_CAPACITY_TOKENS: &str = "logitd_queue_capacity_tokens";
/// Tokens per packed batch.
pub const BATCH_TOKENS: &str = "logitd_batch_tokens";
/// Sequences per packed batch.
pub const BATCH_SEQUENCES: &str = "logitd_batch_sequences";
/// Teacher forward time per batch.
pub const FORWARD_DURATION: &str = "logitd_forward_duration_seconds";
/// LM head + sampling time per batch.
pub const SAMPLE_DURATION: &str = "logitd_sample_duration_seconds";
/// Tokens of the sequences scored (a shared prefix counted per sequence; the
/// forward ran this less [`SHARED_PREFIX_TOKENS`]).
pub const TOKENS: &str = "logitd_tokens_total";
/// Tokens of the sequences scored that the forward did not run because they
/// were a prefix shared with another sequence of the batch (computed once).
pub const SHARED_PREFIX_TOKENS: &str = "logitd_shared_prefix_tokens_total";
/// Encoded response bytes sent.
pub const RESPONSE_BYTES: &str = "logitd_response_bytes_total";
/// Distinct sampled ids per position.
pub const SAMPLED_UNIQUE_IDS: &str = "logitd_sampled_unique_ids";
/// Teacher probability mass of the sampled ids per position (Σ_S p).
pub const TEACHER_MASS_COVERED: &str = "logitd_teacher_mass_covered_ratio";
/// Queued sequences dropped before compute, by `reason`.
pub const DROPPED: &str = "logitd_dropped_total";
/// 1, labelled with the served model.
pub const MODEL_INFO: &str = "logitd_model_info";

const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const TOKEN_COUNTS: &[f64] =
    &[16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0];
const SEQUENCE_COUNTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const IDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
const RATIOS: &[f64] = &[0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0];

/// Builds the recorder with every histogram's buckets, installs it globally
/// (once per process) and returns the handle that renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: std::sync::OnceLock<Result<PrometheusHandle, String>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut b = PrometheusBuilder::new();
            for (name, buckets) in [
                (REQUEST_DURATION, SECONDS),
                (QUEUE_DURATION, SECONDS),
                (FORWARD_DURATION, SECONDS),
                (SAMPLE_DURATION, SECONDS),
                (BATCH_TOKENS, TOKEN_COUNTS),
                (BATCH_SEQUENCES, SEQUENCE_COUNTS),
                (SAMPLED_UNIQUE_IDS, IDS),
                (TEACHER_MASS_COVERED, RATIOS),
            ] {
                b = b
                    .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                    .map_err(|e| e.to_string())?;
            }
            let recorder = b.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS, "gRPC calls answered, by method and status code");
    describe_counter!(ERRORS, "gRPC calls failed, by method, status code and error type");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Wall time of a gRPC call");
    describe_histogram!(QUEUE_DURATION, Unit::Seconds, "Time a sequence waited in the queue");
    describe_gauge!(QUEUE_TOKENS, "Tokens waiting in the queue");
    describe_gauge!(QUEUE_CAPACITY_TOKENS, "Queue capacity in tokens (--max-queue-tokens)");
    describe_histogram!(BATCH_TOKENS, "Tokens per packed batch");
    describe_histogram!(BATCH_SEQUENCES, "Sequences per packed batch");
    describe_histogram!(FORWARD_DURATION, Unit::Seconds, "Teacher forward time per batch");
    describe_histogram!(SAMPLE_DURATION, Unit::Seconds, "LM head and sampling time per batch");
    describe_counter!(
        TOKENS,
        "Tokens of the sequences scored (a shared prefix counted once per sequence)"
    );
    describe_counter!(
        SHARED_PREFIX_TOKENS,
        "Tokens not run through the teacher because sequences of a batch shared their prefix"
    );
    describe_counter!(RESPONSE_BYTES, Unit::Bytes, "Encoded response bytes");
    describe_histogram!(SAMPLED_UNIQUE_IDS, "Distinct sampled ids per position");
    describe_histogram!(
        TEACHER_MASS_COVERED,
        "Teacher probability mass of the sampled ids per position"
    );
    describe_counter!(DROPPED, "Queued sequences dropped before compute, by reason");
    describe_gauge!(MODEL_INFO, "The served teacher (always 1)");
}

/// How often the recorder's pending histogram samples are folded into their
/// buckets (see [`serve`]).
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `GET /metrics` on `listener` until `shutdown` resolves. Meanwhile it runs the
/// recorder's upkeep every [`UPKEEP_INTERVAL`]: the recorder keeps every
/// histogram sample until upkeep or a scrape folds it into the buckets, so a
/// server nobody scrapes (or scrapes rarely) would otherwise grow by every
/// sample it records, several per position served (the overload test saw
/// +280 MiB in a minute).
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let upkeep = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        })
    };
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    upkeep.abort();
    served
}

/// The address a metrics listener is bound to, for logs.
pub fn describe_addr(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
