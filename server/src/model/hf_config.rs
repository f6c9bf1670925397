//! A Hugging Face `config.json` as serde reads it ([`HfConfig`]), and its
//! [`HfConfig::into_config`] into the one [`ModelConfig`]: the defaults and
//! checks of each `model_type`. Reads no files and builds no tensors.

use serde::Deserialize;

use super::{
    ModelError,
    config::{Activation, Arch, LayerKind, ModelConfig, Rope, RopeScaling, layer_kinds},
};

/// The keys of a `config.json` (or of a multimodal config's `text_config`)
/// that the model code reads; every other key is ignored, and a `null` is
/// the key's absence.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HfConfig {
    model_type: Option<String>,
    text_config: Option<Box<HfConfig>>,
    tie_word_embeddings: Option<bool>,
    vocab_size: Option<u64>,
    hidden_size: Option<u64>,
    intermediate_size: Option<u64>,
    num_attention_heads: Option<u64>,
    num_hidden_layers: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    max_position_embeddings: Option<u64>,
    rms_norm_eps: Option<f64>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeDict>,
    rope_local_base_freq: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    sliding_window: Option<u64>,
    sliding_window_pattern: Option<u64>,
    layer_types: Option<Vec<Option<String>>>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<u64>,
}

/// One RoPE dict: `rope_scaling`, or (transformers 5) `rope_parameters` or
/// one of its per-layer-type entries.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RopeDict {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// `rope_parameters`: per layer type, or one flat dict for every layer.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RopeParameters {
    full_attention: Option<RopeDict>,
    sliding_attention: Option<RopeDict>,
    #[serde(flatten)]
    flat: RopeDict,
}

impl RopeDict {
    /// The RoPE of this dict, with base `theta`.
    fn rope(&self, theta: f64) -> Result<Rope, ModelError> {
        let kind = self.rope_type.as_deref().or(self.kind.as_deref()).unwrap_or("default");
        let factor = || {
            self.factor
                .ok_or_else(|| ModelError::Config(format!("rope scaling `{kind}` needs `factor`")))
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: self.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: self.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: self
                    .original_max_position_embeddings
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
}

fn required(value: Option<u64>, key: &str) -> Result<usize, ModelError> {
    value.map(|x| x as usize).ok_or_else(|| {
        ModelError::Config(format!("config.json: `{key}` is missing or not an integer"))
    })
}

impl HfConfig {
    /// Parses `config.json`.
    /// A value of the wrong type is named by its key (`text_config.head_dim`).
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let config: Self = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let key = e.path().to_string();
            match key.as_str() {
                "." => ModelError::Config(format!("config.json: {}", e.inner())),
                _ => ModelError::Config(format!("config.json: `{key}`: {}", e.inner())),
            }
        })?;
        de.end().map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        Ok(config)
    }

    /// The model configuration (a multimodal Gemma 3 config is read through
    /// its `text_config`).
    pub fn into_config(self) -> Result<ModelConfig, ModelError> {
        let model_type = self.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3_text" | "gemma3" => Arch::Gemma3,
            "" => {
                return Err(ModelError::UnsupportedModelType(
                    "(none: config.json has no `model_type`)".into(),
                ));
            }
            other => return Err(ModelError::UnsupportedModelType(other.into())),
        };
        if model_type != "gemma3" {
            return self.text_into_config(arch, None, false);
        }
        // A multimodal config keeps tie_word_embeddings at the top level, and
        // transformers applies no final soft-cap in
        // Gemma3ForConditionalGeneration, whatever the text config says
        // (released multimodal configs set it to null anyway).
        let tie = self.tie_word_embeddings;
        let text = self.text_config.ok_or_else(|| {
            ModelError::Config("config.json: gemma3 config without `text_config`".into())
        })?;
        text.text_into_config(arch, tie, true)
    }

    /// The configuration of a text model of `arch` (`outer_tie`: the
    /// enclosing config's `tie_word_embeddings`).
    fn text_into_config(
        self,
        arch: Arch,
        outer_tie: Option<bool>,
        multimodal: bool,
    ) -> Result<ModelConfig, ModelError> {
        let hidden_size = required(self.hidden_size, "hidden_size")?;
        let num_heads = required(self.num_attention_heads, "num_attention_heads")?;
        let num_layers = required(self.num_hidden_layers, "num_hidden_layers")?;
        let head_dim = self.head_dim.map_or(hidden_size / num_heads, |x| x as usize);
        let num_kv_heads = self.num_key_value_heads.map_or(num_heads, |x| x as usize);
        if num_heads % num_kv_heads != 0 {
            return Err(ModelError::Config(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let (rope, rope_local) = self.ropes(arch)?;
        let layers = self.layers(arch, num_layers)?;
        let activation = self.activation(arch)?;
        let attn_bias = self.attention_bias.unwrap_or(false);
        let gemma = arch.is_gemma();
        let query_scalar = if gemma {
            self.query_pre_attn_scalar.unwrap_or(head_dim as f64)
        } else {
            head_dim as f64
        };
        Ok(ModelConfig {
            arch,
            vocab_size: required(self.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: required(self.intermediate_size, "intermediate_size")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096) as usize,
            tie_word_embeddings: self.tie_word_embeddings.or(outer_tie).unwrap_or(gemma),
            qkv_bias: arch == Arch::Qwen2 || attn_bias,
            o_bias: attn_bias && matches!(arch, Arch::Llama | Arch::Mistral),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            activation,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            attn_softcap: if gemma { self.attn_logit_softcapping } else { None },
            final_softcap: if gemma && !multimodal { self.final_logit_softcapping } else { None },
            attn_scale: query_scalar.powf(-0.5),
            rope,
            rope_local,
            layers,
        })
    }

    /// RoPE of full-attention layers and of Gemma 3's sliding ones:
    /// transformers 5 `rope_parameters` (flat, or per layer type), else the
    /// legacy `rope_theta` + `rope_scaling` (+ Gemma 3 `rope_local_base_freq`).
    fn ropes(&self, arch: Arch) -> Result<(Rope, Option<Rope>), ModelError> {
        let legacy_theta = self.rope_theta.unwrap_or(10_000.0);
        let dict_rope = |d: &RopeDict| d.rope(d.rope_theta.unwrap_or(legacy_theta));
        let (rope, rope_local) = match &self.rope_parameters {
            Some(p) if p.full_attention.is_some() || p.sliding_attention.is_some() => {
                let full = p.full_attention.as_ref().map(dict_rope).transpose()?;
                let full = full.unwrap_or(Rope { theta: legacy_theta, scaling: RopeScaling::None });
                (full, p.sliding_attention.as_ref().map(dict_rope).transpose()?)
            }
            Some(p) => (dict_rope(&p.flat)?, None),
            None => {
                let local = self
                    .rope_local_base_freq
                    .map(|theta| Rope { theta, scaling: RopeScaling::None });
                let rope = match &self.rope_scaling {
                    Some(s) => s.rope(legacy_theta)?,
                    None => Rope { theta: legacy_theta, scaling: RopeScaling::None },
                };
                (rope, local)
            }
        };
        let rope_local = (arch == Arch::Gemma3)
            .then(|| rope_local.unwrap_or(Rope { theta: 10_000.0, scaling: RopeScaling::None }));
        Ok((rope, rope_local))
    }

    /// What attention each layer does: `layer_types` when given, else each
    /// architecture's rule.
    fn layers(&self, arch: Arch, num_layers: usize) -> Result<Vec<LayerKind>, ModelError> {
        let window = self.sliding_window.map(|x| x as usize);
        let sliding: Vec<bool> = match &self.layer_types {
            Some(types) => {
                if types.len() != num_layers {
                    return Err(ModelError::Config(format!(
                        "layer_types has {} entries for {num_layers} layers",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_deref() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        other => {
                            Err(ModelError::Config(format!("unsupported layer type {other:?}")))
                        }
                    })
                    .collect::<Result<_, _>>()?
            }
            None => (0..num_layers).map(|i| self.layer_slides(arch, i, window)).collect(),
        };
        if sliding.iter().any(|&s| s) && window.is_none() {
            return Err(ModelError::Config("a sliding layer but no `sliding_window`".into()));
        }
        Ok(layer_kinds(arch, &sliding, window))
    }

    /// Whether layer `i` slides when `layer_types` does not say.
    fn layer_slides(&self, arch: Arch, i: usize, window: Option<usize>) -> bool {
        match arch {
            Arch::Gemma2 | Arch::Gemma3 => {
                arch.gemma_layer_slides(i, self.sliding_window_pattern.unwrap_or(6) as usize)
            }
            Arch::Mistral => window.is_some(),
            Arch::Qwen2 | Arch::Qwen3 => {
                self.use_sliding_window.unwrap_or(false)
                    && i >= self.max_window_layers.unwrap_or(0) as usize
            }
            Arch::Llama => false,
        }
    }

    /// The MLP's gate activation (Gemma's default: GELU with tanh).
    fn activation(&self, arch: Arch) -> Result<Activation, ModelError> {
        Ok(match self.hidden_activation.as_deref().or(self.hidden_act.as_deref()) {
            None if arch.is_gemma() => Activation::GeluTanh,
            None | Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu_new") | Some("gelu_fast") => {
                Activation::GeluTanh
            }
            Some("gelu") => Activation::Gelu,
            Some(other) => {
                return Err(ModelError::Config(format!("activation `{other}` is not supported")));
            }
        })
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (a multimodal Gemma 3 config is read
    /// through its `text_config`).
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        HfConfig::parse(text)?.into_config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<ModelConfig, ModelError> {
        let text = format!(
            r#"{{"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 12,
                "intermediate_size": 16, "vocab_size": 10, "sliding_window": 4 {extra}}}"#
        );
        HfConfig::parse(&text)?.into_config()
    }

    #[test]
    fn gemma_layers_slide_in_the_released_patterns_when_the_config_does_not_list_them() {
        let g2 = config(r#", "model_type": "gemma2""#).unwrap();
        let slides: Vec<bool> = g2.layers.iter().map(|l| l.window.is_some()).collect();
        assert_eq!(slides, (0..12).map(|i| i % 2 == 0).collect::<Vec<_>>());
        let g3 = config(r#", "model_type": "gemma3_text""#).unwrap();
        let global: Vec<usize> = (0..12)
            .filter(|&i| g3.layers[i].window.is_none() && !g3.layers[i].local_rope)
            .collect();
        assert_eq!(global, [5, 11], "five sliding layers, then a global one");
        let g3 = config(r#", "model_type": "gemma3_text", "sliding_window_pattern": 3"#).unwrap();
        assert_eq!(g3.layers.iter().filter(|l| l.window.is_none()).count(), 4);
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let e = HfConfig::parse(r#"{"model_type": "llama"}"#).unwrap().into_config().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid model configuration: config.json: `hidden_size` is missing or not an integer"
        );
        let e = config(r#", "model_type": "llama", "head_dim": "4""#).unwrap_err().to_string();
        assert!(e.contains("config.json: `head_dim`: invalid type") && e.contains(r#""4""#), "{e}");
        let e =
            HfConfig::parse(r#"{"model_type": "gemma3", "text_config": {"rms_norm_eps": [1]}}"#)
                .unwrap_err()
                .to_string();
        assert!(e.contains("`text_config.rms_norm_eps`: invalid type"), "{e}");
        let e = HfConfig::parse(r#"{"model_type": "llama"} trailing"#).unwrap_err().to_string();
        assert!(e.contains("config.json: trailing characters"), "{e}");
        let e = HfConfig::parse(r#""llama""#).unwrap_err().to_string();
        assert!(e.contains(r#"config.json: invalid type: string "llama""#), "{e}");
        let e = config(r#", "model_type": "llama", "hidden_act": "relu2""#).unwrap_err();
        assert!(e.to_string().contains("activation `relu2` is not supported"), "{e}");
        let e = config(r#", "model_type": "llama", "rope_scaling": {"rope_type": "yarn"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("rope scaling type `yarn` is not supported"), "{e}");
    }
}
