//! Teacher configuration: one [`ModelConfig`] for every supported architecture,
//! read from a Hugging Face `config.json` (`hf_config.rs`, which converts its
//! serde types into this one way: legacy `rope_theta`/`rope_scaling` keys or
//! transformers-5 `rope_parameters`) or from GGUF metadata (`gguf.rs`); the
//! Gemma sliding pattern both use is [`Arch::gemma_layer_slides`]. This file
//! imports neither.

/// Supported architectures, chosen by `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3/3.x (and SmolLM2, which is a Llama).
    Llama,
    /// Mistral (a Llama with an optional sliding window).
    Mistral,
    /// Qwen2/2.5: biases on q, k, v.
    Qwen2,
    /// Qwen3: RMSNorm on q and k per head.
    Qwen3,
    /// Gemma 2: (1+w) norms, sandwich norms, soft-capping, alternating sliding window.
    Gemma2,
    /// Gemma 3 text: like Gemma 2 plus q/k norms and local/global RoPE.
    Gemma3,
}

impl Arch {
    /// The architecture's `model_type` name.
    pub fn name(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Whether layer `i` of a Gemma slides when the checkpoint does not list
    /// the layer types (GGUF always, HF configs before transformers 5): Gemma 2
    /// alternates starting with a sliding layer; Gemma 3 has `pattern − 1`
    /// sliding layers then a global one (`sliding_window_pattern`, 6 in every
    /// released Gemma 3 and in llama.cpp). False for other architectures.
    pub fn gemma_layer_slides(&self, i: usize, pattern: usize) -> bool {
        match self {
            Arch::Gemma2 => i.is_multiple_of(2),
            Arch::Gemma3 => !(i + 1).is_multiple_of(pattern),
            _ => false,
        }
    }

    /// Gemma-style blocks: norms multiply by (1 + w) in HF checkpoints, norms
    /// after attention and after the MLP, embeddings scaled by √hidden.
    pub fn is_gemma(&self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x · σ(x).
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU (erf).
    Gelu,
}

/// How inverse RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Frequencies divided by `factor` (positions interpolated).
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.1's piecewise rescaling.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// Wavelengths above original / low_freq_factor are scaled.
        low_freq_factor: f64,
        /// Wavelengths below original / high_freq_factor are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
}

/// One RoPE: base and scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Base θ.
    pub theta: f64,
    /// Frequency rescaling.
    pub scaling: RopeScaling,
}

/// What attention a layer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerKind {
    /// A query at position i sees keys j with i − window < j ≤ i; `None` is full causal.
    pub window: Option<usize>,
    /// Uses the local RoPE (Gemma 3 sliding layers) instead of the global one.
    pub local_rope: bool,
}

/// Everything the model code needs, whatever the source format.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than the heads).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest context the model was built for.
    pub max_position_embeddings: usize,
    /// The LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q, k and v projections have biases.
    pub qkv_bias: bool,
    /// The output projection has a bias.
    pub o_bias: bool,
    /// The MLP projections have biases.
    pub mlp_bias: bool,
    /// RMSNorm on q and k per head.
    pub qk_norm: bool,
    /// MLP activation.
    pub activation: Activation,
    /// Multiply embeddings by this (Gemma: √hidden).
    pub embed_scale: Option<f64>,
    /// tanh soft-capping of attention scores.
    pub attn_softcap: Option<f64>,
    /// tanh soft-capping of the final logits.
    pub final_softcap: Option<f64>,
    /// Attention scores are q·k times this.
    pub attn_scale: f64,
    /// RoPE of full-attention layers (all layers but Gemma 3's sliding ones).
    pub rope: Rope,
    /// RoPE of Gemma 3's sliding layers.
    pub rope_local: Option<Rope>,
    /// One entry per layer.
    pub layers: Vec<LayerKind>,
}

/// The attention of each layer: `sliding[i]` says whether layer i uses the
/// sliding `window` (and, on Gemma 3, the local RoPE).
pub(crate) fn layer_kinds(arch: Arch, sliding: &[bool], window: Option<usize>) -> Vec<LayerKind> {
    sliding
        .iter()
        .map(|&s| LayerKind {
            window: if s { window } else { None },
            local_rope: s && arch == Arch::Gemma3,
        })
        .collect()
}

impl ModelConfig {
    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
