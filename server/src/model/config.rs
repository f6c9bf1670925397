//! Teacher configuration: one [`ModelConfig`] for every supported architecture,
//! read from a Hugging Face `config.json` (legacy `rope_theta`/`rope_scaling`
//! keys or transformers-5 `rope_parameters`) or from GGUF metadata.

use serde_json::Value;

use super::ModelError;

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

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn req_usize(v: &Value, key: &str) -> Result<usize, ModelError> {
    get(v, key).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| {
        ModelError::Config(format!("config.json: `{key}` is missing or not an integer"))
    })
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    get(v, key).and_then(Value::as_f64)
}

fn opt_bool(v: &Value, key: &str) -> Option<bool> {
    get(v, key).and_then(Value::as_bool)
}

/// Parses one rope dict (`rope_scaling` or an entry of `rope_parameters`).
fn parse_rope(theta: f64, scaling: Option<&Value>) -> Result<Rope, ModelError> {
    let Some(s) = scaling else { return Ok(Rope { theta, scaling: RopeScaling::None }) };
    let kind =
        get(s, "rope_type").or_else(|| get(s, "type")).and_then(Value::as_str).unwrap_or("default");
    let factor = || {
        opt_f64(s, "factor")
            .ok_or_else(|| ModelError::Config(format!("rope scaling `{kind}` needs `factor`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: opt_f64(s, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: opt_f64(s, "high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: opt_f64(s, "original_max_position_embeddings")
                .ok_or_else(|| {
                    ModelError::Config(
                        "llama3 rope scaling needs `original_max_position_embeddings`".into(),
                    )
                })?,
        },
        other => {
            return Err(ModelError::Config(format!(
                "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
            )));
        }
    };
    Ok(Rope { theta, scaling })
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (a multimodal Gemma 3 config is read
    /// through its `text_config`).
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let model_type = get(&root, "model_type").and_then(Value::as_str).unwrap_or_default();
        let (v, arch) = match model_type {
            "llama" => (&root, Arch::Llama),
            "mistral" => (&root, Arch::Mistral),
            "qwen2" => (&root, Arch::Qwen2),
            "qwen3" => (&root, Arch::Qwen3),
            "gemma2" => (&root, Arch::Gemma2),
            "gemma3_text" => (&root, Arch::Gemma3),
            "gemma3" => (
                get(&root, "text_config").ok_or_else(|| {
                    ModelError::Config("config.json: gemma3 config without `text_config`".into())
                })?,
                Arch::Gemma3,
            ),
            other => {
                return Err(ModelError::UnsupportedModelType(if other.is_empty() {
                    "(none: config.json has no `model_type`)".into()
                } else {
                    other.into()
                }));
            }
        };
        // A multimodal config keeps tie_word_embeddings at the top level.
        let tie = opt_bool(v, "tie_word_embeddings")
            .or_else(|| opt_bool(&root, "tie_word_embeddings"))
            .unwrap_or(arch.is_gemma());
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_heads = req_usize(v, "num_attention_heads")?;
        let num_layers = req_usize(v, "num_hidden_layers")?;
        let head_dim = get(v, "head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads);
        let num_kv_heads = get(v, "num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(ModelError::Config(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }

        // RoPE: transformers 5 `rope_parameters` (flat, or per layer type), else
        // the legacy `rope_theta` + `rope_scaling` (+ Gemma 3 `rope_local_base_freq`).
        let legacy_theta = opt_f64(v, "rope_theta").unwrap_or(10_000.0);
        let (rope, rope_local) = match get(v, "rope_parameters") {
            Some(p)
                if get(p, "full_attention").is_some() || get(p, "sliding_attention").is_some() =>
            {
                let one = |key: &str| -> Result<Option<Rope>, ModelError> {
                    get(p, key)
                        .map(|r| {
                            parse_rope(opt_f64(r, "rope_theta").unwrap_or(legacy_theta), Some(r))
                        })
                        .transpose()
                };
                let full = one("full_attention")?
                    .unwrap_or(Rope { theta: legacy_theta, scaling: RopeScaling::None });
                (full, one("sliding_attention")?)
            }
            Some(p) => {
                (parse_rope(opt_f64(p, "rope_theta").unwrap_or(legacy_theta), Some(p))?, None)
            }
            None => {
                let local = opt_f64(v, "rope_local_base_freq")
                    .map(|theta| Rope { theta, scaling: RopeScaling::None });
                (parse_rope(legacy_theta, get(v, "rope_scaling"))?, local)
            }
        };
        let rope_local = match arch {
            Arch::Gemma3 => {
                Some(rope_local.unwrap_or(Rope { theta: 10_000.0, scaling: RopeScaling::None }))
            }
            _ => None,
        };

        // Which layers slide.
        let window = get(v, "sliding_window").and_then(Value::as_u64).map(|x| x as usize);
        let sliding: Vec<bool> = if let Some(types) =
            get(v, "layer_types").and_then(Value::as_array)
        {
            if types.len() != num_layers {
                return Err(ModelError::Config(format!(
                    "layer_types has {} entries for {num_layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    other => Err(ModelError::Config(format!("unsupported layer type {other:?}"))),
                })
                .collect::<Result<_, _>>()?
        } else {
            (0..num_layers)
                .map(|i| match arch {
                    Arch::Gemma2 => i % 2 == 0,
                    Arch::Gemma3 => {
                        let pattern = get(v, "sliding_window_pattern")
                            .and_then(Value::as_u64)
                            .unwrap_or(6) as usize;
                        (i + 1) % pattern != 0
                    }
                    Arch::Mistral => window.is_some(),
                    Arch::Qwen2 | Arch::Qwen3 => {
                        opt_bool(v, "use_sliding_window").unwrap_or(false)
                            && i >= get(v, "max_window_layers").and_then(Value::as_u64).unwrap_or(0)
                                as usize
                    }
                    Arch::Llama => false,
                })
                .collect()
        };
        let layers = sliding
            .iter()
            .map(|&s| {
                if s && window.is_none() {
                    return Err(ModelError::Config(
                        "a sliding layer but no `sliding_window`".into(),
                    ));
                }
                Ok(LayerKind {
                    window: if s { window } else { None },
                    local_rope: s && arch == Arch::Gemma3,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let activation = match get(v, "hidden_activation")
            .or_else(|| get(v, "hidden_act"))
            .and_then(Value::as_str)
        {
            None if arch.is_gemma() => Activation::GeluTanh,
            None | Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu_new") | Some("gelu_fast") => {
                Activation::GeluTanh
            }
            Some("gelu") => Activation::Gelu,
            Some(other) => {
                return Err(ModelError::Config(format!("activation `{other}` is not supported")));
            }
        };
        let attn_bias = opt_bool(v, "attention_bias").unwrap_or(false);
        let query_scalar = match arch {
            Arch::Gemma2 | Arch::Gemma3 => {
                opt_f64(v, "query_pre_attn_scalar").unwrap_or(head_dim as f64)
            }
            _ => head_dim as f64,
        };
        Ok(ModelConfig {
            arch,
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps").unwrap_or(1e-6),
            max_position_embeddings: get(v, "max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            tie_word_embeddings: tie,
            qkv_bias: arch == Arch::Qwen2 || attn_bias,
            o_bias: attn_bias && matches!(arch, Arch::Llama | Arch::Mistral),
            mlp_bias: opt_bool(v, "mlp_bias").unwrap_or(false),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            activation,
            embed_scale: arch.is_gemma().then(|| (hidden_size as f64).sqrt()),
            attn_softcap: if arch.is_gemma() { opt_f64(v, "attn_logit_softcapping") } else { None },
            // transformers applies the final soft-cap in Gemma3ForCausalLM but not in
            // Gemma3ForConditionalGeneration (model_type `gemma3`), whatever the
            // text config says; released multimodal configs set it to null anyway.
            final_softcap: if arch.is_gemma() && model_type != "gemma3" {
                opt_f64(v, "final_logit_softcapping")
            } else {
                None
            },
            attn_scale: query_scalar.powf(-0.5),
            rope,
            rope_local,
            layers,
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
