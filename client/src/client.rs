//! [`TeacherClient`]: one or many logitd endpoints behind one balanced channel,
//! with deadlines, retries with jittered backoff on UNAVAILABLE and
//! RESOURCE_EXHAUSTED (never on INVALID_ARGUMENT), large batches split into
//! concurrent requests, and a tokenizer check on connect.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use logitd_proto::v1::{
    GetModelInfoRequest, ModelInfo, SampleLogitsRequest, SampleLogitsResponse, SamplingMethod,
    Sequence, ValueEncoding, teacher_client::TeacherClient as RawClient,
};
use rand::RngExt;
use tonic::{
    Code, Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::{TargetsError, TeacherTargets};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An endpoint URI or TLS setting is invalid.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The server's tokenizer is not the trainer's.
    #[error(
        "the teacher's tokenizer (sha256 {server}) differs from the trainer's ({expected}); targets would index the wrong tokens"
    )]
    TokenizerMismatch {
        /// What the trainer expects.
        expected: String,
        /// What the server reports.
        server: String,
    },
    /// The server's vocabulary size is not the trainer's.
    #[error("the teacher's vocabulary has {server} ids, the trainer's {expected}")]
    VocabMismatch {
        /// What the trainer expects.
        expected: u32,
        /// What the server reports.
        server: u32,
    },
    /// The call failed (after retries, where the status is retryable).
    #[error("teacher call failed after {attempts} attempt(s): {status}")]
    Rpc {
        /// The last status.
        status: Status,
        /// Attempts made.
        attempts: u32,
    },
    /// A reply could not be decoded into targets.
    #[error(transparent)]
    Targets(#[from] TargetsError),
    /// The call's arguments do not fit together (nothing was sent).
    #[error("invalid request: {0}")]
    Request(String),
}

impl ClientError {
    /// An [`Rpc`](ClientError::Rpc) error whose status is
    /// [`explain_status`]d for `endpoints`.
    pub(crate) fn rpc(status: Status, attempts: u32, endpoints: &[String]) -> Self {
        ClientError::Rpc { status: explain_status(status, endpoints), attempts }
    }

    /// The gRPC code, for an [`Rpc`](ClientError::Rpc) error.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// The prefix of tonic's message for a reply without `grpc-status` (an HTTP
/// server that is not gRPC), followed by the HTTP status code.
const NOT_GRPC: &str = "grpc-status header missing, mapped from HTTP status code ";

/// A status that says what went wrong with the connection, where the failure
/// is the connection's rather than the server's; any other is returned as it
/// is. The code, details and metadata are kept (callers and the Python
/// package map errors by code); the message is rewritten:
///
/// - The connection could not be made (UNAVAILABLE from the transport): the
///   message names the address(es) tried and the cause (connection refused,
///   timed out, the DNS error, ...), then tonic's own message.
/// - The address answered HTTP without `grpc-status` (tonic maps the HTTP
///   status to a code, e.g. 404 to UNIMPLEMENTED), or answered in HTTP/1
///   (its reply is no HTTP/2 frame: the client's HTTP/2 layer closes the
///   connection with FRAME_SIZE_ERROR, INTERNAL here): the message names the
///   address, says that it answers HTTP but not gRPC and that it may be
///   logitd's metrics port or HTTP front rather than its gRPC `--listen` port.
///
/// `endpoints` are the client's URIs; with several, the balanced channel does
/// not say which one failed, so all are named.
pub fn explain_status(status: Status, endpoints: &[String]) -> Status {
    let at = match endpoints {
        [one] => one.clone(),
        many => format!("any of {}", many.join(", ")),
    };
    const HINT: &str = "is it logitd's metrics port (--metrics-listen) or its HTTP front \
                        (--http-listen) instead of the gRPC --listen port?";
    let message = if let Some(http) = status.message().strip_prefix(NOT_GRPC) {
        format!("{at} answers HTTP (status {http}) but not gRPC: {HINT} ({})", status.message())
    } else if answered_http1(&status) {
        format!(
            "{at} answers HTTP/1, not HTTP/2, so not gRPC: {HINT} (its reply was no HTTP/2 \
             frame: {})",
            status.message()
        )
    } else if status.code() == Code::Unavailable
        && let Some(cause) = transport_cause(&status)
    {
        format!("could not connect to {at} ({cause}): {}", status.message())
    } else {
        return status;
    };
    let details = tonic::codegen::Bytes::copy_from_slice(status.details());
    Status::with_details_and_metadata(status.code(), message, details, status.metadata().clone())
}

/// Whether the connection failed because the peer's bytes were no HTTP/2
/// frame: the client's HTTP/2 layer sent GOAWAY with FRAME_SIZE_ERROR (an
/// HTTP/1 reply, `HTTP/1.1 …`, read as a frame header gives a length of
/// 4.7 MB, over any frame size a client allows).
fn answered_http1(status: &Status) -> bool {
    use std::error::Error as _;
    let mut e = status.source();
    while let Some(err) = e {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away()
                && h2.is_library()
                && h2.reason() == Some(h2::Reason::FRAME_SIZE_ERROR);
        }
        e = err.source();
    }
    false
}

/// Why a transport failure happened, from its source chain: the I/O error's
/// kind in words where it has a common one, else the innermost error's text.
/// None for a status that did not come from the transport (no source).
fn transport_cause(status: &Status) -> Option<String> {
    use std::{error::Error as _, io::ErrorKind};
    let mut e: &(dyn std::error::Error + 'static) = status.source()?;
    loop {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let kind = match io.kind() {
                ErrorKind::ConnectionRefused => "connection refused",
                ErrorKind::TimedOut => "timed out",
                ErrorKind::ConnectionReset => "connection reset",
                ErrorKind::ConnectionAborted => "connection aborted",
                ErrorKind::HostUnreachable => "host unreachable",
                ErrorKind::NetworkUnreachable => "network unreachable",
                ErrorKind::AddrNotAvailable => "address not available",
                _ => return Some(io.to_string()),
            };
            return Some(kind.into());
        }
        match e.source() {
            Some(next) => e = next,
            None => return Some(e.to_string()),
        }
    }
}

/// How failed calls are retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub max_attempts: u32,
    /// Backoff bound of the first retry; doubles each time.
    pub initial_backoff: Duration,
    /// Largest backoff bound.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Whether a call that failed with `code` is worth another attempt: the
    /// server is down, restarting, draining or overloaded.
    pub fn retryable(code: Code) -> bool {
        matches!(code, Code::Unavailable | Code::ResourceExhausted)
    }

    /// [`retryable`](Self::retryable), plus any failure that comes from the
    /// transport rather than from the server (CANCELLED or UNKNOWN carrying a
    /// source error, which a status read from the server's trailers never
    /// has: a transport, HTTP/2 or I/O error; the connection closed under the call,
    /// e.g. a replica that drained, crashed or was killed): the server never
    /// answered it, and a teacher call is idempotent. The client's own
    /// deadline shows as DEADLINE_EXCEEDED and is not retried.
    /// A server certificate the client refuses (another CA, another name,
    /// expired) is not: tonic reports it as UNAVAILABLE, but every attempt
    /// would fail alike, so the caller gets it at once.
    pub fn retryable_status(status: &Status) -> bool {
        use std::error::Error as _;
        if Self::certificate_refused(status) {
            return false;
        }
        Self::retryable(status.code())
            || (matches!(status.code(), Code::Cancelled | Code::Unknown)
                && status.source().is_some())
    }

    /// The TLS handshake failed on the server's certificate (rustls' message,
    /// which tonic carries into the status).
    fn certificate_refused(status: &Status) -> bool {
        status.code() == Code::Unavailable && status.message().contains("invalid peer certificate")
    }

    /// "Full jitter" backoff before retry `attempt` (1-based): uniform in
    /// [0, min(max, initial · 2^(attempt−1))].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let bound = self
            .initial_backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        bound.mul_f64(rand::rng().random::<f64>())
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server URIs, e.g. `http://10.0.0.7:50051`; several are balanced per call.
    pub endpoints: Vec<String>,
    /// Sent as `authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// TLS settings (for `https://` endpoints).
    pub tls: Option<ClientTlsConfig>,
    /// Deadline of each call.
    pub timeout: Duration,
    /// Retries.
    pub retry: RetryPolicy,
    /// Sequences per request when a batch is split.
    pub max_sequences_per_request: usize,
    /// Split requests in flight at once.
    pub max_concurrent_requests: usize,
    /// Refuse a server whose tokenizer digest differs (from ModelInfo).
    pub expect_tokenizer_sha256: Option<String>,
    /// Refuse a server whose vocabulary size differs.
    pub expect_vocab_size: Option<u32>,
}

impl ClientConfig {
    /// Defaults for `endpoints`: 120 s deadline, 8 attempts, 64 sequences per
    /// request, 8 requests in flight, no tokenizer check.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            bearer_token: None,
            tls: None,
            timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            max_sequences_per_request: 64,
            max_concurrent_requests: 8,
            expect_tokenizer_sha256: None,
            expect_vocab_size: None,
        }
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The raw generated client with auth, for calls this wrapper does not cover.
pub type RawTeacherClient = RawClient<InterceptedService<Channel, Auth>>;

/// How to sample a batch (everything of a request but its sequences).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SampleOptions {
    /// k (0 = the server default).
    pub num_samples: u32,
    /// Temperature (None = 1).
    pub temperature: Option<f32>,
    /// Seed of the batch. Each sequence without its own seed gets one derived
    /// from it and its index in the batch, so results do not depend on how the
    /// client splits the batch into requests.
    pub seed: u64,
    /// Sampling or top-k (default `Unspecified`, which the server reads as
    /// sampling; it is not written on the wire).
    pub method: SamplingMethod,
    /// How log-probabilities are sent (default `Unspecified`, which the server
    /// reads as f32; it is not written on the wire).
    pub value_encoding: ValueEncoding,
    /// Also return the realised next token's log p and rank at every position
    /// ([`TeacherTargets::token_logprobs`]), as on-policy distillation needs.
    pub token_logprobs: bool,
}

/// Candidate ids of one sequence, per returned position (CSR): position p
/// (the sequence's `first_position + p`) names `ids[offsets[p]..offsets[p + 1]]`.
/// The teacher's log p at each comes back in
/// [`TeacherTargets::candidate_logprobs`], in this order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Candidates {
    /// Returned positions + 1 entries, from 0.
    pub offsets: Vec<u32>,
    /// The ids.
    pub ids: Vec<u32>,
}

impl Candidates {
    /// The same `k` ids at every one of `positions` positions, given as a
    /// row-major `[positions, k]` slice.
    pub fn dense(ids: &[u32], k: usize) -> Self {
        let positions = ids.len().checked_div(k).unwrap_or(0);
        Self { offsets: (0..=positions).map(|p| (p * k) as u32).collect(), ids: ids.to_vec() }
    }
}

impl SampleOptions {
    /// The one place a [`SampleLogitsRequest`] is built: `sequences` with these
    /// options, the request's seed being `seed`.
    pub fn request(&self, sequences: Vec<Sequence>) -> SampleLogitsRequest {
        SampleLogitsRequest {
            sequences,
            num_samples: self.num_samples,
            temperature: self.temperature,
            seed: Some(self.seed),
            method: self.method as i32,
            value_encoding: self.value_encoding as i32,
            return_token_logprobs: self.token_logprobs,
        }
    }
}

/// The [`Sequence`]s of a batch: sequence i is `token_ids[i]`, starts returning
/// at `first_positions[i]` (or 0) and has the seed
/// [`sequence_seed`]`(batch_seed, i)`.
pub fn seeded_sequences(
    token_ids: &[Vec<u32>],
    first_positions: Option<&[u32]>,
    batch_seed: u64,
) -> Vec<Sequence> {
    token_ids
        .iter()
        .enumerate()
        .map(|(i, tokens)| Sequence {
            token_ids: tokens.clone(),
            first_position: first_positions.map_or(0, |f| f[i]),
            seed: Some(sequence_seed(batch_seed, i as u64)),
            ..Default::default()
        })
        .collect()
}

/// A sequence's seed derived from the batch seed and its index (splitmix64).
pub fn sequence_seed(batch_seed: u64, index: u64) -> u64 {
    let mut x = batch_seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A connected teacher.
#[derive(Clone)]
pub struct TeacherClient {
    raw: RawTeacherClient,
    info: ModelInfo,
    config: ClientConfig,
}

impl TeacherClient {
    /// Builds the channel (balanced over all endpoints; connections are made
    /// lazily and re-made after failures), fetches ModelInfo (with retries) and
    /// checks the tokenizer and vocabulary the config expects.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints".into()));
        }
        let mut endpoints = Vec::new();
        for uri in &config.endpoints {
            let mut e = Endpoint::from_shared(uri.clone())
                .map_err(|e| ClientError::Config(format!("endpoint {uri:?}: {e}")))?
                .connect_timeout(Duration::from_secs(10))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30));
            if let Some(tls) = &config.tls {
                e = e
                    .tls_config(tls.clone())
                    .map_err(|e| ClientError::Config(format!("TLS for {uri:?}: {e}")))?;
            }
            endpoints.push(e);
        }
        let channel = if endpoints.len() == 1 {
            endpoints.pop().expect("one endpoint").connect_lazy()
        } else {
            Channel::balance_list(endpoints.into_iter())
        };
        let token = match &config.bearer_token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                ClientError::Config("the bearer token is not valid header text".into())
            })?),
            None => None,
        };
        let raw = RawClient::with_interceptor(channel, Auth(token))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut client = Self { raw, info: ModelInfo::default(), config };
        client.info = client
            .with_retries(|mut raw| async move { raw.get_model_info(GetModelInfoRequest {}).await })
            .await?;
        if let Some(expected) = &client.config.expect_tokenizer_sha256
            && !expected.eq_ignore_ascii_case(&client.info.tokenizer_sha256)
        {
            return Err(ClientError::TokenizerMismatch {
                expected: expected.clone(),
                server: client.info.tokenizer_sha256.clone(),
            });
        }
        if let Some(expected) = client.config.expect_vocab_size
            && expected != client.info.vocab_size
        {
            return Err(ClientError::VocabMismatch { expected, server: client.info.vocab_size });
        }
        Ok(client)
    }

    /// What the server reported on connect.
    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// The generated client (with auth) for anything else, e.g. streaming.
    pub fn raw(&self) -> RawTeacherClient {
        self.raw.clone()
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(RawTeacherClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let policy = self.config.retry;
        let mut attempt = 1;
        loop {
            match tokio::time::timeout(self.config.timeout, call(self.raw.clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(status))
                    if RetryPolicy::retryable_status(&status) && attempt < policy.max_attempts =>
                {
                    tracing::debug!(code = ?status.code(), attempt, "retrying teacher call");
                }
                Ok(Err(status)) => {
                    return Err(ClientError::rpc(status, attempt, &self.config.endpoints));
                }
                Err(_) => {
                    let status = Status::deadline_exceeded(format!(
                        "no answer within {:?}",
                        self.config.timeout
                    ));
                    return Err(ClientError::Rpc { status, attempts: attempt });
                }
            }
            tokio::time::sleep(policy.backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// One request, with the deadline and retries.
    pub async fn sample(
        &self,
        request: SampleLogitsRequest,
    ) -> Result<SampleLogitsResponse, ClientError> {
        let timeout = self.config.timeout;
        self.with_retries(|mut raw| {
            let mut req = Request::new(request.clone());
            req.set_timeout(timeout);
            async move { raw.sample_logits(req).await }
        })
        .await
    }

    /// Teacher targets for every sequence of a batch, in order. The batch is
    /// split into requests of at most `max_sequences_per_request` sequences,
    /// sent concurrently (at most `max_concurrent_requests`), and reassembled.
    /// `first_positions[i]` (or 0) is the first returned position of sequence i.
    pub async fn sample_targets(
        &self,
        sequences: &[Vec<u32>],
        first_positions: Option<&[u32]>,
        options: SampleOptions,
    ) -> Result<Vec<TeacherTargets>, ClientError> {
        self.sample_targets_with_candidates(sequences, first_positions, None, options).await
    }

    /// [`sample_targets`](Self::sample_targets), also scoring `candidates[i]`
    /// at sequence i's returned positions.
    pub async fn sample_targets_with_candidates(
        &self,
        sequences: &[Vec<u32>],
        first_positions: Option<&[u32]>,
        candidates: Option<&[Candidates]>,
        options: SampleOptions,
    ) -> Result<Vec<TeacherTargets>, ClientError> {
        if let Some(c) = candidates
            && c.len() != sequences.len()
        {
            return Err(ClientError::Request(format!(
                "{} candidate sets for {} sequences",
                c.len(),
                sequences.len()
            )));
        }
        let requests = self.requests_with(sequences, first_positions, candidates, options);
        let responses: Vec<SampleLogitsResponse> =
            futures::stream::iter(requests.into_iter().map(|r| self.sample(r)))
                .buffered(self.config.max_concurrent_requests.max(1))
                .try_collect()
                .await?;
        let mut targets = Vec::with_capacity(sequences.len());
        for r in responses {
            for s in &r.sequences {
                targets.push(TeacherTargets::from_sequence(
                    s,
                    r.num_samples,
                    r.value_encoding,
                    r.method,
                )?);
            }
        }
        Ok(targets)
    }

    /// The requests [`sample_targets`](Self::sample_targets) sends for a batch.
    pub fn requests(
        &self,
        sequences: &[Vec<u32>],
        first_positions: Option<&[u32]>,
        options: SampleOptions,
    ) -> Vec<SampleLogitsRequest> {
        self.requests_with(sequences, first_positions, None, options)
    }

    fn requests_with(
        &self,
        sequences: &[Vec<u32>],
        first_positions: Option<&[u32]>,
        candidates: Option<&[Candidates]>,
        options: SampleOptions,
    ) -> Vec<SampleLogitsRequest> {
        let mut all = seeded_sequences(sequences, first_positions, options.seed);
        if let Some(candidates) = candidates {
            for (s, c) in all.iter_mut().zip(candidates) {
                s.candidate_offsets = c.offsets.clone();
                s.candidate_ids = c.ids.clone();
            }
        }
        all.chunks(self.config.max_sequences_per_request.max(1))
            .map(|chunk| options.request(chunk.to_vec()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The builder writes exactly the request the client wrote field by field
    /// before it existed (the enums as their proto numbers).
    #[test]
    fn the_request_carries_every_option_as_its_wire_number() {
        let options = SampleOptions {
            num_samples: 12,
            temperature: Some(0.5),
            seed: 99,
            method: SamplingMethod::TopK,
            value_encoding: ValueEncoding::Bf16,
            ..Default::default()
        };
        let sequences = seeded_sequences(&[vec![1, 2, 3], vec![4, 5]], Some(&[1, 0]), 99);
        let want = SampleLogitsRequest {
            sequences: vec![
                Sequence {
                    token_ids: vec![1, 2, 3],
                    first_position: 1,
                    seed: Some(sequence_seed(99, 0)),
                    ..Default::default()
                },
                Sequence {
                    token_ids: vec![4, 5],
                    first_position: 0,
                    seed: Some(sequence_seed(99, 1)),
                    ..Default::default()
                },
            ],
            num_samples: 12,
            temperature: Some(0.5),
            seed: Some(99),
            method: 2,
            value_encoding: 3,
            ..Default::default()
        };
        let got = options.request(sequences);
        assert_eq!(got, want);
        assert_eq!(got.encode_to_vec(), want.encode_to_vec());
    }

    /// The default options leave method and encoding unspecified (0, which
    /// proto3 does not write; the server reads them as sampling and f32), as the
    /// i32 defaults did.
    #[test]
    fn default_options_write_no_method_or_encoding() {
        let got = SampleOptions { num_samples: 4, seed: 7, ..Default::default() }
            .request(seeded_sequences(&[vec![9]], None, 7));
        assert_eq!((got.method, got.value_encoding), (0, 0));
        let want = SampleLogitsRequest {
            sequences: vec![Sequence {
                token_ids: vec![9],
                first_position: 0,
                seed: Some(sequence_seed(7, 0)),
                ..Default::default()
            }],
            num_samples: 4,
            temperature: None,
            seed: Some(7),
            method: 0,
            value_encoding: 0,
            ..Default::default()
        };
        assert_eq!(got.encode_to_vec(), want.encode_to_vec());
    }
}
