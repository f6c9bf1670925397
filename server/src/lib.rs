//! logitd: a teacher language model served over gRPC for knowledge distillation.
//!
//! - [`sampler`]: the sampling contract and its CPU reference implementation.
//! - [`model`]: the teacher (own model code on candle) over packed batches.
//! - [`queue`], [`engine`]: the batching queue, the batcher and engine threads.
//! - [`service`], [`server`]: the gRPC service and the `serve` command.
//! - [`http`]: the vLLM, SGLang and TRL scoring endpoints over HTTP (`--http-listen`).
//! - [`error`]: every way a call fails, and its gRPC status.
//! - [`response`]: sampled rows → the wire's columnar sequences.
//! - [`metrics`], [`config`], [`device`]: metric names, the command line, device set-up.

pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod http;
pub mod kernels;
pub mod malloc;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod response;
pub mod sampler;
pub mod scoring;
pub mod server;
pub mod service;
