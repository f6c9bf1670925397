//! The logitd wire protocol, `logitd.v1`, generated from
//! `proto/logitd/v1/teacher.proto`, plus the encodings of log-probability values
//! (f32, f16, bf16), the row arithmetic of sampled targets ([`csr`]) and the
//! names of gRPC status codes, shared by the server and the client.

/// Generated messages and the `Teacher` service client and server.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("logitd.v1");
}

/// The encoded file descriptor set of `logitd.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("logitd_v1_descriptor");

pub mod csr;
mod status;
mod values;

pub use status::code_name;
pub use values::{DecodeError, Values, decode_values, encode_values};
