//! logitd: a teacher language model served over gRPC for knowledge distillation.
//!
//! Layers, each importing only from those before it (checked by
//! `tests/arch/check_layers.py`):
//!
//! - [`kernels`]: the CPU exponentials shared by the model and the sampler.
//! - [`sampler`]: the sampling contract and its CPU reference implementation.
//! - [`model`]: the teacher (own model code on candle) over packed batches.
//! - [`scoring`]: the seam joining them (scoring backend, LM head, sampler
//!   backend, the errors of a batch).
//! - [`queue`], [`engine`]: the batching queue, the batcher and engine threads.
//! - [`auth`], [`service`], [`server`]: bearer tokens, the gRPC service and the `serve` command.
//! - [`http`]: the vLLM, SGLang and TRL scoring endpoints over HTTP (`--http-listen`).
//! - [`error`]: every way a call fails, and its gRPC status.
//! - [`response`]: sampled rows → the wire's columnar sequences.
//! - [`metrics`], [`cli`], [`device`]: metric names, the command line, device set-up.

pub mod auth;
pub mod cli;
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
