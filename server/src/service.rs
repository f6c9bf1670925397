//! The `logitd.v1.Teacher` gRPC service: validation, submission to the
//! scheduler, reassembly and encoding of the reply.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use logitd_proto::v1::{
    GetModelInfoRequest, ModelInfo, SampleLogitsRequest, SampleLogitsResponse, SamplingMethod,
    Sequence, ValueEncoding, teacher_server::Teacher,
};
use prost::Message;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::{
    engine::SchedulerHandle,
    metrics as m,
    queue::{ItemResult, SubmitError, WorkItem},
    response::sampled_sequence,
    sampler::{Method, RowKey, SamplingParams},
};

/// Limits a request is validated against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Vocabulary size of the teacher.
    pub vocab_size: u32,
    /// Longest sequence.
    pub max_sequence_length: u32,
    /// k when the request says 0.
    pub default_num_samples: u32,
    /// Largest k.
    pub max_num_samples: u32,
    /// Most tokens in one request (the queue capacity).
    pub max_request_tokens: usize,
    /// Deadline when the client sends none.
    pub default_timeout: Duration,
}

impl Limits {
    /// Checks a request; the message names the offending value.
    pub fn validate(
        &self,
        req: &SampleLogitsRequest,
    ) -> Result<(SamplingParams, ValueEncoding), Status> {
        let l = self;
        let bad = |m: String| Err(Status::invalid_argument(m));
        if req.sequences.is_empty() {
            return bad("request has no sequences".into());
        }
        let mut total = 0usize;
        for (i, s) in req.sequences.iter().enumerate() {
            let n = s.token_ids.len();
            if n == 0 {
                return bad(format!("sequence {i} is empty"));
            }
            if n > l.max_sequence_length as usize {
                return bad(format!(
                    "sequence {i} has {n} tokens, more than the max_sequence_length of {}",
                    l.max_sequence_length
                ));
            }
            if let Some((p, &t)) = s.token_ids.iter().enumerate().find(|(_, t)| **t >= l.vocab_size)
            {
                return bad(format!(
                    "sequence {i}, position {p}: token id {t} is outside the vocabulary (vocab_size {})",
                    l.vocab_size
                ));
            }
            if s.first_position as usize >= n {
                return bad(format!(
                    "sequence {i}: first_position {} must be less than its length {n}",
                    s.first_position
                ));
            }
            total += n;
        }
        if total > l.max_request_tokens {
            return bad(format!(
                "request has {total} tokens, more than the server queues at once ({}); split it into smaller requests",
                l.max_request_tokens
            ));
        }
        let k = if req.num_samples == 0 { l.default_num_samples } else { req.num_samples };
        if k > l.max_num_samples {
            return bad(format!(
                "num_samples {k} is more than the max_num_samples of {}",
                l.max_num_samples
            ));
        }
        let method = match SamplingMethod::try_from(req.method) {
            Ok(SamplingMethod::Unspecified | SamplingMethod::Sample) => Method::Sample,
            Ok(SamplingMethod::TopK) => Method::TopK,
            Err(_) => return bad(format!("method {} is not a SamplingMethod", req.method)),
        };
        let encoding = ValueEncoding::try_from(req.value_encoding).map_err(|_| {
            Status::invalid_argument(format!(
                "value_encoding {} is not a ValueEncoding",
                req.value_encoding
            ))
        })?;
        let t = req.temperature.unwrap_or(1.0);
        let params = SamplingParams::new(method, k, t).map_err(|_| {
            Status::invalid_argument(format!("temperature {t} must be finite and > 0"))
        })?;
        Ok((params, encoding))
    }
}

/// The service state shared by all calls.
pub struct TeacherService {
    scheduler: SchedulerHandle,
    limits: Limits,
    info: ModelInfo,
}

/// Requests answered concurrently on one stream (answers still come in order).
const STREAM_IN_FLIGHT: usize = 8;

impl TeacherService {
    /// A service submitting to `scheduler`.
    pub fn new(scheduler: SchedulerHandle, limits: Limits, info: ModelInfo) -> Self {
        Self { scheduler, limits, info }
    }

    /// Runs one request end to end.
    pub async fn sample(
        &self,
        req: SampleLogitsRequest,
        deadline: Option<Instant>,
    ) -> Result<SampleLogitsResponse, Status> {
        let (params, encoding) = self.limits.validate(&req)?;
        let seed = req.seed.unwrap_or_else(rand::random);
        let now = Instant::now();
        let deadline = deadline.unwrap_or(now + self.limits.default_timeout);
        let firsts: Vec<u32> = req.sequences.iter().map(|s| s.first_position).collect();
        let (items, receivers) = work_items(req.sequences, params, seed, Some(deadline), now);
        self.scheduler.submit(items).map_err(|e| match e {
            SubmitError::Full { .. } => Status::resource_exhausted(e.to_string()),
            SubmitError::Closed => Status::unavailable(e.to_string()),
        })?;
        let deadline_exceeded = || {
            Status::deadline_exceeded(format!(
                "the deadline ({} ms after the request arrived) passed before the answer was ready",
                deadline.saturating_duration_since(now).as_millis()
            ))
        };
        // At the deadline the receivers are dropped, and the batcher drops the
        // items it has not started.
        let answers = async {
            let mut sequences = Vec::with_capacity(receivers.len());
            for (rx, first) in receivers.into_iter().zip(firsts) {
                let rows = rx
                    .await
                    .map_err(|_| {
                        // The batcher drops (never computes) an item whose
                        // deadline has passed, which closes its reply channel:
                        // that is this call's deadline, not a stopped engine
                        // (UNAVAILABLE would tell clients to retry).
                        if Instant::now() >= deadline {
                            deadline_exceeded()
                        } else {
                            Status::unavailable("the engine stopped before answering")
                        }
                    })?
                    .map_err(|e| {
                        Status::internal(format!("the teacher failed on this batch: {e}"))
                    })?;
                sequences.push(sampled_sequence(rows, first, encoding));
            }
            Ok::<_, Status>(sequences)
        };
        let sequences = tokio::time::timeout_at(deadline.into(), answers)
            .await
            .map_err(|_| deadline_exceeded())??;
        let response = SampleLogitsResponse {
            sequences,
            seed,
            model_id: self.info.model_id.clone(),
            num_samples: params.num_samples(),
            temperature: params.temperature(),
            method: match params.method() {
                Method::Sample => SamplingMethod::Sample,
                Method::TopK => SamplingMethod::TopK,
            } as i32,
            value_encoding: match encoding {
                ValueEncoding::Unspecified => ValueEncoding::F32,
                e => e,
            } as i32,
        };
        metrics::counter!(m::RESPONSE_BYTES).increment(response.encoded_len() as u64);
        Ok(response)
    }
}

/// The queue's work items of a validated request's sequences (one each, keyed
/// as the sampling contract says), with the receivers their results arrive on.
pub fn work_items(
    sequences: Vec<Sequence>,
    params: SamplingParams,
    seed: u64,
    deadline: Option<Instant>,
    now: Instant,
) -> (Vec<WorkItem>, Vec<oneshot::Receiver<ItemResult>>) {
    sequences
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let key = RowKey::for_sequence(seed, i as u32, s.seed, 0);
            WorkItem::new(s.token_ids, s.first_position, params, key, deadline, now)
        })
        .unzip()
}

/// Reads the client's `grpc-timeout` header (e.g. `250m`, `30S`) as a deadline.
pub fn deadline_from_metadata(meta: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

fn record(method: &'static str, started: Instant, status: tonic::Code) {
    metrics::counter!(m::REQUESTS, "method" => method, "status" => code_label(status)).increment(1);
    metrics::histogram!(m::REQUEST_DURATION, "method" => method)
        .record(started.elapsed().as_secs_f64());
}

/// The status label of a gRPC code (stable strings for metrics).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The gRPC face of the [`TeacherService`], which exists once the model is
/// loaded and warmed up; until then every call is UNAVAILABLE. Teacher calls
/// beyond `max_calls` at once are refused with RESOURCE_EXHAUSTED (a stream
/// holds its slot while it is open); health checks are not counted.
#[derive(Clone)]
pub struct Grpc {
    service: Arc<std::sync::OnceLock<Arc<TeacherService>>>,
    calls: Arc<tokio::sync::Semaphore>,
    max_calls: usize,
}

impl Grpc {
    /// A face answering UNAVAILABLE until [`set_ready`](Self::set_ready).
    pub fn new(max_calls: usize) -> Self {
        Self {
            service: Arc::default(),
            calls: Arc::new(tokio::sync::Semaphore::new(max_calls)),
            max_calls,
        }
    }

    /// Starts serving calls with `service`.
    pub fn set_ready(&self, service: TeacherService) {
        let _ = self.service.set(Arc::new(service));
    }

    fn ready(&self) -> Result<Arc<TeacherService>, Status> {
        self.service
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("the teacher is still loading; retry shortly"))
    }

    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.calls.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} calls are in progress, the limit of --max-concurrent-requests; retry with backoff",
                self.max_calls
            ))
        })
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<SampleLogitsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Teacher for Grpc {
    async fn sample_logits(
        &self,
        request: Request<SampleLogitsRequest>,
    ) -> Result<Response<SampleLogitsResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline_from_metadata(request.metadata());
        let result = match self.ready().and_then(|s| Ok((s, self.slot()?))) {
            Ok((service, _slot)) => service.sample(request.into_inner(), deadline).await,
            Err(status) => Err(status),
        };
        record(
            "SampleLogits",
            started,
            result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        result.map(Response::new)
    }

    type SampleLogitsStreamStream = ResponseStream;

    async fn sample_logits_stream(
        &self,
        request: Request<tonic::Streaming<SampleLogitsRequest>>,
    ) -> Result<Response<Self::SampleLogitsStreamStream>, Status> {
        let deadline = deadline_from_metadata(request.metadata());
        let service = self.ready()?;
        let slot = match self.slot() {
            Ok(slot) => slot,
            Err(status) => {
                record("SampleLogitsStream", Instant::now(), status.code());
                return Err(status);
            }
        };
        let inbound = request.into_inner();
        // Up to STREAM_IN_FLIGHT requests of the stream are served at once;
        // `buffered` yields their answers in request order, and the next request
        // is read only when an answer is taken (flow control end to end).
        // An error names the request of the stream it answers, and ends the stream.
        let outbound = inbound
            .enumerate()
            .map(move |(i, req)| {
                let service = service.clone();
                async move {
                    let started = Instant::now();
                    let result = match req {
                        Ok(req) => service.sample(req, deadline).await,
                        Err(status) => Err(status),
                    }
                    .map_err(|s| {
                        Status::new(s.code(), format!("request {i} of the stream: {}", s.message()))
                    });
                    record(
                        "SampleLogitsStream",
                        started,
                        result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
                    );
                    result
                }
            })
            .buffered(STREAM_IN_FLIGHT)
            .map(move |answer| {
                let _held = &slot;
                answer
            });
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn get_model_info(
        &self,
        _: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let started = Instant::now();
        let result = self.ready().map(|s| s.info.clone());
        record(
            "GetModelInfo",
            started,
            result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        result.map(Response::new)
    }
}
