//! The teacher: our own model code on candle-nn pieces, over packed varlen
//! batches, returning every position (no KV cache, no padding).
//!
//! - [`ModelConfig`] describes any supported architecture ([`Arch`]).
//! - [`Teacher::load`] reads a Hugging Face directory (safetensors, mmapped) or a
//!   GGUF file (dequantised at load).
//! - [`Teacher::hidden_states`] runs a [`PackedBatch`]; [`Teacher::head_logits`]
//!   gives the LM head's logits of chosen hidden-state rows. The model stops at
//!   logits: chunking the head and sampling belong to the sampler backend
//!   (`crate::sampler::SamplerBackend`).

mod attention_cpu;
mod config;
mod gguf;
mod hf_config;
mod mlp_cpu;
mod teacher;
mod tokenizer;
mod weights;

use std::path::PathBuf;

pub use attention_cpu::{DEFAULT_QUERY_BLOCK, Segment};
pub use config::{Activation, Arch, LayerKind, ModelConfig, Rope, RopeScaling};
pub use teacher::{DEFAULT_ATTENTION_TILE_ELEMENTS, PackedBatch, Teacher};
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
