//! logitd's integration tests in one binary (one link of candle and tonic, not
//! fifteen): each file of server/tests is a module here, its name the filter,
//! e.g. `cargo test --test it -- teacher_fixtures::`. Apart, in binaries of their
//! own: `cpu_simd_env` (sets process-wide environment), and the GPU tests
//! (`gpu_sampler`, `gpu_cases`, `cuda_math`) that tests/gpu/pack.sh carries.

mod common;

#[path = "attention_tiles.rs"]
mod attention_tiles;
#[path = "bad_input.rs"]
mod bad_input;
#[path = "cli.rs"]
mod cli;
#[path = "gguf_fixtures.rs"]
mod gguf_fixtures;
#[path = "half_fixtures.rs"]
mod half_fixtures;
#[path = "http.rs"]
mod http;
#[path = "interop.rs"]
mod interop;
#[path = "memory.rs"]
mod memory;
#[path = "overload.rs"]
mod overload;
#[path = "real_teachers.rs"]
mod real_teachers;
#[path = "replies.rs"]
mod replies;
#[path = "sampler_contract.rs"]
mod sampler_contract;
#[path = "security.rs"]
mod security;
#[path = "service.rs"]
mod service;
#[path = "shared_prefix.rs"]
mod shared_prefix;
#[path = "teacher_fixtures.rs"]
mod teacher_fixtures;
#[path = "teacher_sampling.rs"]
mod teacher_sampling;
