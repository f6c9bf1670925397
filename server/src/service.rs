//! The `logitd.v1.Teacher` gRPC service: validation into a
//! [`ValidatedRequest`], submission to the scheduler, reassembly and encoding
//! of the reply. Failures are [`ServiceError`]s until the tonic boundary; it
//! builds no `Status` itself and never touches the model or the sampler.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use logitd_proto::v1::{
    GetModelInfoRequest, ModelInfo, SampleLogitsRequest, SampleLogitsResponse, SampledSequence,
    SamplingMethod, Sequence, ValueEncoding, teacher_server::Teacher,
};
use prost::Message;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::{
    engine::SchedulerHandle,
    error::{ServiceError, ValidationError},
    metrics as m,
    queue::{ItemResult, Scores, WorkItem},
    response::{Asked, sampled_sequence},
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
    /// Most candidate ids for one position.
    pub max_candidates: u32,
    /// Deadline when the client sends none.
    pub default_timeout: Duration,
}

/// A request that passed [`Limits::validate`]: its sequences, the sampling
/// parameters and encoding it asked for (defaults applied), and its seed.
#[derive(Debug, Clone)]
pub struct ValidatedRequest {
    /// The sequences, each non-empty, within the vocabulary and the limits.
    pub sequences: Vec<Sequence>,
    /// Method, k and temperature.
    pub params: SamplingParams,
    /// How the log-probabilities go on the wire.
    pub encoding: ValueEncoding,
    /// The request's seed, if it sent one.
    pub seed: Option<u64>,
    /// Whether it asked for the realised tokens' log-probabilities.
    pub token_logprobs: bool,
}

impl Limits {
    /// Checks a request; the error names the offending value.
    pub fn validate(&self, req: SampleLogitsRequest) -> Result<ValidatedRequest, ValidationError> {
        let total = self.validate_sequences(&req.sequences)?;
        if total > self.max_request_tokens {
            return Err(ValidationError::RequestTooLarge {
                tokens: total,
                max: self.max_request_tokens,
            });
        }
        let k = if req.num_samples == 0 { self.default_num_samples } else { req.num_samples };
        if k > self.max_num_samples {
            return Err(ValidationError::TooManySamples { k, max: self.max_num_samples });
        }
        let method = match SamplingMethod::try_from(req.method) {
            Ok(SamplingMethod::Unspecified | SamplingMethod::Sample) => Method::Sample,
            Ok(SamplingMethod::TopK) => Method::TopK,
            Ok(SamplingMethod::None) => Method::None,
            Err(_) => return Err(ValidationError::UnknownMethod(req.method)),
        };
        let encoding = ValueEncoding::try_from(req.value_encoding)
            .map_err(|_| ValidationError::UnknownValueEncoding(req.value_encoding))?;
        let t = req.temperature.unwrap_or(1.0);
        let params =
            SamplingParams::new(method, k, t).map_err(|_| ValidationError::BadTemperature(t))?;
        Ok(ValidatedRequest {
            sequences: req.sequences,
            params,
            encoding,
            seed: req.seed,
            token_logprobs: req.return_token_logprobs,
        })
    }

    /// Checks a sequence's candidates (CSR over its returned positions).
    fn validate_candidates(&self, index: usize, s: &Sequence) -> Result<(), ValidationError> {
        let (offsets, ids) = (&s.candidate_offsets, &s.candidate_ids);
        if offsets.is_empty() {
            if ids.is_empty() {
                return Ok(());
            }
            return Err(ValidationError::CandidatesWithoutOffsets { index, ids: ids.len() });
        }
        let positions = s.token_ids.len() - s.first_position as usize;
        let bad = |problem: String| ValidationError::BadCandidateOffsets {
            index,
            problem,
            expected: positions + 1,
            ids: ids.len(),
        };
        if offsets.len() != positions + 1 {
            return Err(bad(format!("has {} entries", offsets.len())));
        }
        if offsets[0] != 0 {
            return Err(bad(format!("starts at {}", offsets[0])));
        }
        if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(bad(format!(
                "decreases at entry {} ({} after {})",
                i + 1,
                offsets[i + 1],
                offsets[i]
            )));
        }
        let last = *offsets.last().expect("not empty");
        if last as usize != ids.len() {
            return Err(bad(format!("ends at {last}")));
        }
        for (i, w) in offsets.windows(2).enumerate() {
            let position = s.first_position + i as u32;
            let count = (w[1] - w[0]) as usize;
            if count > self.max_candidates as usize {
                let max = self.max_candidates;
                return Err(ValidationError::TooManyCandidates { index, position, count, max });
            }
            let row = &ids[w[0] as usize..w[1] as usize];
            if let Some(&id) = row.iter().find(|&&id| id >= self.vocab_size) {
                let vocab_size = self.vocab_size;
                return Err(ValidationError::CandidateOutsideVocabulary {
                    index,
                    position,
                    id,
                    vocab_size,
                });
            }
        }
        Ok(())
    }

    /// Checks every sequence; returns their total tokens.
    fn validate_sequences(&self, sequences: &[Sequence]) -> Result<usize, ValidationError> {
        if sequences.is_empty() {
            return Err(ValidationError::NoSequences);
        }
        let mut total = 0usize;
        for (index, s) in sequences.iter().enumerate() {
            let len = s.token_ids.len();
            if len == 0 {
                return Err(ValidationError::EmptySequence { index });
            }
            if len > self.max_sequence_length as usize {
                let max = self.max_sequence_length;
                return Err(ValidationError::SequenceTooLong { index, len, max });
            }
            let outside = s.token_ids.iter().enumerate().find(|(_, t)| **t >= self.vocab_size);
            if let Some((position, &token)) = outside {
                let vocab_size = self.vocab_size;
                return Err(ValidationError::TokenOutsideVocabulary {
                    index,
                    position,
                    token,
                    vocab_size,
                });
            }
            if s.first_position as usize >= len {
                let first_position = s.first_position;
                return Err(ValidationError::FirstPositionPastEnd { index, first_position, len });
            }
            self.validate_candidates(index, s)?;
            total += len;
        }
        Ok(total)
    }
}

/// The service state shared by all calls.
pub struct LoadedService {
    scheduler: SchedulerHandle,
    limits: Limits,
    info: ModelInfo,
}

/// Requests answered concurrently on one stream (answers still come in order).
const STREAM_IN_FLIGHT: usize = 8;

impl LoadedService {
    /// A service submitting to `scheduler`.
    pub fn new(scheduler: SchedulerHandle, limits: Limits, info: ModelInfo) -> Self {
        Self { scheduler, limits, info }
    }

    /// What GetModelInfo answers.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Runs one request end to end.
    pub async fn sample(
        &self,
        req: SampleLogitsRequest,
        deadline: Option<Instant>,
    ) -> Result<SampleLogitsResponse, ServiceError> {
        let req = self.limits.validate(req)?;
        let (params, encoding) = (req.params, req.encoding);
        let seed = req.seed.unwrap_or_else(rand::random);
        let now = Instant::now();
        let deadline = deadline.unwrap_or(now + self.limits.default_timeout);
        let asked: Vec<Asked> = req
            .sequences
            .iter()
            .map(|s| Asked {
                first_position: s.first_position,
                method: params.method(),
                token_logprobs: req.token_logprobs,
                candidates: !s.candidate_offsets.is_empty(),
            })
            .collect();
        let (items, receivers) =
            work_items(req.sequences, params, req.token_logprobs, seed, Some(deadline), now);
        self.scheduler.submit(items)?;
        let deadline_exceeded = || ServiceError::DeadlineExceeded {
            after_ms: deadline.saturating_duration_since(now).as_millis(),
        };
        // At the deadline the receivers are dropped, and the batcher drops the
        // items it has not started.
        let answers = async {
            let mut sequences = Vec::with_capacity(receivers.len());
            for (rx, asked) in receivers.into_iter().zip(asked) {
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
                            ServiceError::EngineStopped
                        }
                    })?
                    .map_err(ServiceError::Engine)?;
                sequences.push(sampled_sequence(rows, asked, encoding));
            }
            Ok::<_, ServiceError>(sequences)
        };
        let sequences = tokio::time::timeout_at(deadline.into(), answers)
            .await
            .map_err(|_| deadline_exceeded())??;
        let response = self.response(sequences, seed, params, encoding);
        metrics::counter!(m::RESPONSE_BYTES).increment(response.encoded_len() as u64);
        Ok(response)
    }

    /// The response to a request answered with `sequences`.
    fn response(
        &self,
        sequences: Vec<SampledSequence>,
        seed: u64,
        params: SamplingParams,
        encoding: ValueEncoding,
    ) -> SampleLogitsResponse {
        SampleLogitsResponse {
            sequences,
            seed,
            model_id: self.info.model_id.clone(),
            // Scoring alone draws nothing: k is 0.
            num_samples: if params.method() == Method::None { 0 } else { params.num_samples() },
            temperature: params.temperature(),
            method: match params.method() {
                Method::Sample => SamplingMethod::Sample,
                Method::TopK => SamplingMethod::TopK,
                Method::None => SamplingMethod::None,
            } as i32,
            value_encoding: match encoding {
                ValueEncoding::Unspecified => ValueEncoding::F32,
                e => e,
            } as i32,
        }
    }
}

/// The queue's work items of a validated request's sequences (one each, keyed
/// as the sampling contract says, scoring the realised tokens when
/// `token_logprobs` and the sequence's candidates), with the receivers their
/// results arrive on.
pub fn work_items(
    sequences: Vec<Sequence>,
    params: SamplingParams,
    token_logprobs: bool,
    seed: u64,
    deadline: Option<Instant>,
    now: Instant,
) -> (Vec<WorkItem>, Vec<oneshot::Receiver<ItemResult>>) {
    sequences
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let key = RowKey::for_sequence(seed, i as u32, s.seed, 0);
            let (mut item, rx) =
                WorkItem::new(s.token_ids, s.first_position, params, key, deadline, now);
            item.scores = Scores {
                realised: token_logprobs,
                candidate_offsets: s.candidate_offsets,
                candidate_ids: s.candidate_ids,
            };
            (item, rx)
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

/// Counts a call by method and status (and an error by its type) and records
/// its duration.
fn record<T>(method: &'static str, started: Instant, result: &Result<T, ServiceError>) {
    let status = result.as_ref().map_or_else(ServiceError::code, |_| tonic::Code::Ok);
    metrics::counter!(m::REQUESTS, "method" => method, "status" => logitd_proto::code_name(status))
        .increment(1);
    if let Err(e) = result {
        metrics::counter!(m::ERRORS, "method" => method, "status" => logitd_proto::code_name(status),
            "error_type" => e.error_type())
        .increment(1);
    }
    metrics::histogram!(m::REQUEST_DURATION, "method" => method)
        .record(started.elapsed().as_secs_f64());
}

/// The gRPC face of the [`LoadedService`], which exists once the model is
/// loaded and warmed up; until then every call is UNAVAILABLE. Teacher calls
/// beyond `max_calls` at once are refused with RESOURCE_EXHAUSTED (a stream
/// holds its slot while it is open); health checks are not counted.
#[derive(Clone)]
pub struct TeacherService {
    service: Arc<std::sync::OnceLock<Arc<LoadedService>>>,
    calls: Arc<tokio::sync::Semaphore>,
    max_calls: usize,
}

impl TeacherService {
    /// A face answering UNAVAILABLE until [`set_ready`](Self::set_ready).
    pub fn new(max_calls: usize) -> Self {
        Self {
            service: Arc::default(),
            calls: Arc::new(tokio::sync::Semaphore::new(max_calls)),
            max_calls,
        }
    }

    /// Starts serving calls with `service`.
    pub fn set_ready(&self, service: LoadedService) {
        let _ = self.service.set(Arc::new(service));
    }

    pub(crate) fn ready(&self) -> Result<Arc<LoadedService>, ServiceError> {
        self.service.get().cloned().ok_or(ServiceError::NotReady)
    }

    pub(crate) fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        self.calls
            .clone()
            .try_acquire_owned()
            .map_err(|_| ServiceError::TooManyCalls { limit: self.max_calls })
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<SampleLogitsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Teacher for TeacherService {
    async fn sample_logits(
        &self,
        request: Request<SampleLogitsRequest>,
    ) -> Result<Response<SampleLogitsResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline_from_metadata(request.metadata());
        let result = match self.ready().and_then(|s| Ok((s, self.slot()?))) {
            Ok((service, _slot)) => service.sample(request.into_inner(), deadline).await,
            Err(e) => Err(e),
        };
        record("SampleLogits", started, &result);
        Ok(Response::new(result?))
    }

    type SampleLogitsStreamStream = ResponseStream;

    async fn sample_logits_stream(
        &self,
        request: Request<tonic::Streaming<SampleLogitsRequest>>,
    ) -> Result<Response<Self::SampleLogitsStreamStream>, Status> {
        let deadline = deadline_from_metadata(request.metadata());
        let service = self.ready()?;
        let slot = self.slot();
        if slot.is_err() {
            record("SampleLogitsStream", Instant::now(), &slot);
        }
        let slot = slot?;
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
                        Err(status) => Err(ServiceError::Inbound(status)),
                    }
                    .map_err(|e| ServiceError::InStream { index: i, source: Box::new(e) });
                    record("SampleLogitsStream", started, &result);
                    result.map_err(Status::from)
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
        record("GetModelInfo", started, &result);
        Ok(Response::new(result?))
    }
}
