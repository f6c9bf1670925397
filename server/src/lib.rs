//! logitd: a teacher language model served over gRPC for knowledge distillation.
//!
//! Modules:
//! - [`sampler`]: the sampling contract and its CPU reference implementation.
//! - [`response`]: turning sampled rows into the wire's columnar sequences.

pub mod model;
pub mod response;
pub mod sampler;
