//! Every way a call can fail, typed from the engine to the wire: one
//! [`ServiceError`], one `impl From<ServiceError> for Status` (the only place
//! the server builds a gRPC status), and one [`ServiceError::error_type`], the
//! label of `logitd_errors_total`. Owns no state and runs no I/O.

use std::sync::Arc;

use tonic::{Code, Status};

use crate::{queue::SubmitError, scoring::EngineError};

/// Why a request is invalid; each message names the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// The request has no sequences.
    #[error("request has no sequences")]
    NoSequences,
    /// A sequence has no tokens.
    #[error("sequence {index} is empty")]
    EmptySequence {
        /// The sequence.
        index: usize,
    },
    /// A sequence is longer than the server takes.
    #[error("sequence {index} has {len} tokens, more than the max_sequence_length of {max}")]
    SequenceTooLong {
        /// The sequence.
        index: usize,
        /// Its tokens.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// A token id is outside the vocabulary.
    #[error(
        "sequence {index}, position {position}: token id {token} is outside the vocabulary (vocab_size {vocab_size})"
    )]
    TokenOutsideVocabulary {
        /// The sequence.
        index: usize,
        /// The position.
        position: usize,
        /// The id sent.
        token: u32,
        /// The vocabulary size.
        vocab_size: u32,
    },
    /// `first_position` is past the sequence's end.
    #[error("sequence {index}: first_position {first_position} must be less than its length {len}")]
    FirstPositionPastEnd {
        /// The sequence.
        index: usize,
        /// The value sent.
        first_position: u32,
        /// The sequence's tokens.
        len: usize,
    },
    /// The request has more tokens than the queue holds.
    #[error(
        "request has {tokens} tokens, more than the server queues at once ({max}); split it into smaller requests"
    )]
    RequestTooLarge {
        /// Tokens of the request.
        tokens: usize,
        /// The limit.
        max: usize,
    },
    /// k is above the limit.
    #[error("num_samples {k} is more than the max_num_samples of {max}")]
    TooManySamples {
        /// k asked (or the default).
        k: u32,
        /// The limit.
        max: u32,
    },
    /// `method` is not a SamplingMethod.
    #[error("method {0} is not a SamplingMethod")]
    UnknownMethod(i32),
    /// `value_encoding` is not a ValueEncoding.
    #[error("value_encoding {0} is not a ValueEncoding")]
    UnknownValueEncoding(i32),
    /// The temperature is not finite and positive.
    #[error("temperature {0} must be finite and > 0")]
    BadTemperature(f32),
    /// `candidate_offsets` is not one per returned position plus one, from 0,
    /// non-decreasing, ending at the number of candidate ids.
    #[error(
        "sequence {index}: candidate_offsets {problem}; it must be empty or have one entry per returned position plus one ({expected}), start at 0, never decrease and end at the {ids} candidate_ids"
    )]
    BadCandidateOffsets {
        /// The sequence.
        index: usize,
        /// What is wrong, naming the value.
        problem: String,
        /// Entries expected.
        expected: usize,
        /// Candidate ids sent.
        ids: usize,
    },
    /// Candidate ids without offsets saying which positions they belong to.
    #[error("sequence {index}: {ids} candidate_ids but no candidate_offsets")]
    CandidatesWithoutOffsets {
        /// The sequence.
        index: usize,
        /// Candidate ids sent.
        ids: usize,
    },
    /// A candidate id is outside the vocabulary.
    #[error(
        "sequence {index}, position {position}: candidate id {id} is outside the vocabulary (vocab_size {vocab_size})"
    )]
    CandidateOutsideVocabulary {
        /// The sequence.
        index: usize,
        /// The position (in the sequence).
        position: u32,
        /// The id sent.
        id: u32,
        /// The vocabulary size.
        vocab_size: u32,
    },
    /// More candidates for one position than the server takes.
    #[error(
        "sequence {index}, position {position}: {count} candidate ids, more than the max_candidates of {max}"
    )]
    TooManyCandidates {
        /// The sequence.
        index: usize,
        /// The position (in the sequence).
        position: u32,
        /// Candidates sent for it.
        count: usize,
        /// The limit.
        max: u32,
    },
}

/// Why the bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing `authorization: Bearer <token>` metadata")]
    Missing,
    /// The token sent is not the server's.
    #[error("invalid bearer token")]
    Invalid,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is invalid (INVALID_ARGUMENT).
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The queue is full or closed (RESOURCE_EXHAUSTED or UNAVAILABLE).
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The deadline passed before the answer was ready (DEADLINE_EXCEEDED).
    #[error(
        "the deadline ({after_ms} ms after the request arrived) passed before the answer was ready"
    )]
    DeadlineExceeded {
        /// The deadline, after the request arrived.
        after_ms: u128,
    },
    /// The engine thread went away before answering (UNAVAILABLE).
    #[error("the engine stopped before answering")]
    EngineStopped,
    /// The batch holding the request failed (INTERNAL).
    #[error("the teacher failed on this batch: {0}")]
    Engine(Arc<EngineError>),
    /// The model is still loading (UNAVAILABLE).
    #[error("the teacher is still loading; retry shortly")]
    NotReady,
    /// Too many calls at once (RESOURCE_EXHAUSTED).
    #[error(
        "{limit} calls are in progress, the limit of --max-concurrent-requests; retry with backoff"
    )]
    TooManyCalls {
        /// `--max-concurrent-requests`.
        limit: usize,
    },
    /// The bearer token was refused (UNAUTHENTICATED).
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    /// Reading a request of a stream failed (tonic's own status, kept as is).
    #[error("{}", .0.message())]
    Inbound(Status),
    /// A request of a stream failed: its error, naming the request.
    #[error("request {index} of the stream: {source}")]
    InStream {
        /// The request's index in the stream.
        index: usize,
        /// Its error.
        source: Box<ServiceError>,
    },
}

impl ServiceError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::Validation(_) => Code::InvalidArgument,
            ServiceError::Submit(SubmitError::Full { .. }) => Code::ResourceExhausted,
            ServiceError::Submit(SubmitError::Closed) => Code::Unavailable,
            ServiceError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            ServiceError::EngineStopped | ServiceError::NotReady => Code::Unavailable,
            ServiceError::Engine(_) => Code::Internal,
            ServiceError::TooManyCalls { .. } => Code::ResourceExhausted,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::Inbound(status) => status.code(),
            ServiceError::InStream { source, .. } => source.code(),
        }
    }

    /// A stable label for metrics and logs: what went wrong, finer than the
    /// gRPC code (a non-finite logit, a device error and an injected fault
    /// are all INTERNAL, each with its own type).
    pub fn error_type(&self) -> &'static str {
        match self {
            ServiceError::Validation(_) => "validation",
            ServiceError::Submit(SubmitError::Full { .. }) => "overloaded",
            ServiceError::Submit(SubmitError::Closed) => "shutting_down",
            ServiceError::DeadlineExceeded { .. } => "deadline_exceeded",
            ServiceError::EngineStopped => "engine_stopped",
            ServiceError::Engine(e) => e.kind(),
            ServiceError::NotReady => "not_ready",
            ServiceError::TooManyCalls { .. } => "too_many_calls",
            ServiceError::Unauthenticated(_) => "unauthenticated",
            ServiceError::Inbound(_) => "stream_read",
            ServiceError::InStream { source, .. } => source.error_type(),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::ModelError, sampler::SamplerError};

    #[test]
    fn internal_failures_keep_one_code_but_get_their_own_type() {
        let engine = |e: EngineError| ServiceError::Engine(Arc::new(e));
        let cases = [
            (engine(EngineError::InjectedFault(2)), "injected_fault"),
            (
                engine(EngineError::from(SamplerError::NonFiniteLogit {
                    index: 3,
                    value: f32::NAN,
                })),
                "sampler",
            ),
            (
                engine(EngineError::from(ModelError::Candle(candle_core::Error::Msg(
                    "out of memory".into(),
                )))),
                "device",
            ),
        ];
        for (e, label) in cases {
            assert_eq!(e.error_type(), label);
            assert_eq!(Status::from(e).code(), Code::Internal);
        }
    }

    #[test]
    fn a_stream_error_names_its_request_and_keeps_its_code_and_type() {
        let inner = ServiceError::Validation(ValidationError::TooManySamples { k: 513, max: 512 });
        let e = ServiceError::InStream { index: 1, source: Box::new(inner) };
        assert_eq!(e.error_type(), "validation");
        let status = Status::from(e);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "request 1 of the stream: num_samples 513 is more than the max_num_samples of 512"
        );
    }
}
