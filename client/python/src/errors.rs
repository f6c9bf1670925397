//! Rust errors as the typed exceptions of `logitd.errors`.

use logitd_client::{ClientError, shard::ShardError};
use pyo3::{exceptions::PyRuntimeError, prelude::*};
use tonic::Code;

/// The exception class of `logitd.errors` for a gRPC code.
fn class_of(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument | Code::OutOfRange => "InvalidArgument",
        Code::Unavailable => "Unavailable",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::Unauthenticated => "Unauthenticated",
        Code::PermissionDenied => "PermissionDenied",
        Code::Cancelled => "Cancelled",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        _ => "LogitdError",
    }
}

/// An instance of `logitd.errors.<class>(message, code=..., attempts=...)`.
pub(crate) fn make(
    py: Python<'_>,
    class: &str,
    message: String,
    code: Option<&str>,
    attempts: Option<u32>,
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("logitd.errors")?.getattr(class)?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("code", code)?;
        kwargs.set_item("attempts", attempts)?;
        Ok(PyErr::from_value(cls.call((message.clone(),), Some(&kwargs))?))
    };
    build().unwrap_or_else(|e| {
        PyRuntimeError::new_err(format!("{message} (and logitd.errors failed: {e})"))
    })
}

/// A client error as its typed exception: RPC failures by their gRPC code
/// with the server's message, the tokenizer and vocabulary checks, malformed
/// replies and configuration errors.
pub(crate) fn client_error(py: Python<'_>, e: ClientError) -> PyErr {
    match &e {
        ClientError::Rpc { status, attempts } => make(
            py,
            class_of(status.code()),
            status.message().to_string(),
            Some(logitd_proto::code_name(status.code())),
            Some(*attempts),
        ),
        ClientError::TokenizerMismatch { .. } => {
            make(py, "TokenizerMismatch", e.to_string(), None, None)
        }
        ClientError::VocabMismatch { .. } => make(py, "VocabMismatch", e.to_string(), None, None),
        ClientError::Config(_) | ClientError::Request(_) => {
            make(py, "ConfigError", e.to_string(), None, None)
        }
        ClientError::Targets(_) => make(py, "MalformedTargets", e.to_string(), None, None),
    }
}

/// A shard error as `logitd.errors.ShardError`.
pub(crate) fn shard_error(py: Python<'_>, e: ShardError) -> PyErr {
    make(py, "ShardError", e.to_string(), None, None)
}

/// `logitd.errors.InvalidArgument` raised by the client itself (no server code).
pub(crate) fn invalid_argument(py: Python<'_>, message: String) -> PyErr {
    make(py, "InvalidArgument", message, None, None)
}
