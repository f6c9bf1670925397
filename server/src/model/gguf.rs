//! GGUF files (llama.cpp): metadata → [`ModelConfig`], llama.cpp tensor names →
//! Hugging Face names, quantised tensors dequantised to f32 at load with
//! candle's quantized module.

use std::{fs::File, io::BufReader, path::Path};

use candle_core::{
    Device, Tensor,
    quantized::gguf_file::{Content, Value},
};

use super::{
    Activation, Arch, ModelConfig, ModelError, Rope, RopeScaling,
    config::layer_kinds,
    quant::{QuantData, Stored, is_block_type, is_half, row_size},
    weights::WeightSource,
};

/// A GGUF file with its parsed header.
pub(crate) struct GgufSource {
    content: Content,
    reader: BufReader<File>,
    arch: Arch,
    num_heads: usize,
    num_kv_heads: usize,
}

/// Opens `path` and derives the configuration from its metadata.
pub(crate) fn open(path: &Path) -> Result<(ModelConfig, GgufSource), ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::Gguf(format!("{}: {e}", path.display())))?;
    let config = config_from_metadata(&content)?;
    let source = GgufSource {
        arch: config.arch,
        num_heads: config.num_heads,
        num_kv_heads: config.num_kv_heads,
        content,
        reader,
    };
    Ok((config, source))
}

fn meta<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

fn meta_u(c: &Content, key: &str) -> Result<Option<usize>, ModelError> {
    meta(c, key)
        .map(|v| {
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .or_else(|_| v.to_i32().map(|x| x as usize))
                .map_err(|e| ModelError::Gguf(format!("metadata `{key}`: {e}")))
        })
        .transpose()
}

fn meta_f(c: &Content, key: &str) -> Result<Option<f64>, ModelError> {
    meta(c, key)
        .map(|v| {
            v.to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map_err(|e| ModelError::Gguf(format!("metadata `{key}`: {e}")))
        })
        .transpose()
}

fn req_u(c: &Content, key: &str) -> Result<usize, ModelError> {
    meta_u(c, key)?.ok_or_else(|| ModelError::Gguf(format!("metadata `{key}` is missing")))
}

fn config_from_metadata(c: &Content) -> Result<ModelConfig, ModelError> {
    let arch_name = meta(c, "general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| ModelError::Gguf("metadata `general.architecture` is missing".into()))?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma2" => Arch::Gemma2,
        "gemma3" => Arch::Gemma3,
        other => return Err(ModelError::UnsupportedModelType(format!("{other} (GGUF)"))),
    };
    let a = arch_name.as_str();
    let hidden = req_u(c, &format!("{a}.embedding_length"))?;
    let heads = req_u(c, &format!("{a}.attention.head_count"))?;
    let kv_heads = meta_u(c, &format!("{a}.attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = meta_u(c, &format!("{a}.attention.key_length"))?.unwrap_or(hidden / heads);
    let num_layers = req_u(c, &format!("{a}.block_count"))?;
    let embed = c
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight (GGUF)".into()))?;
    let vocab = embed.shape.dims()[0];
    let theta = meta_f(c, &format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0);
    let scaling = match meta(c, &format!("{a}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
    {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta_f(c, &format!("{a}.rope.scaling.factor"))?.unwrap_or(1.0),
        },
        Some(other) => {
            return Err(ModelError::Gguf(format!("rope scaling type `{other}` is not supported")));
        }
    };
    if c.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::Gguf(
            "rope_freqs.weight (Llama 3.1 frequency factors in GGUF) is not supported yet; \
             load the Hugging Face checkpoint instead"
                .into(),
        ));
    }
    let window = meta_u(c, &format!("{a}.attention.sliding_window"))?;
    // llama.cpp's fixed patterns (Gemma 3: pattern 6).
    let sliding: Vec<bool> = (0..num_layers).map(|i| arch.gemma_layer_slides(i, 6)).collect();
    let layers = layer_kinds(arch, &sliding, window);
    let gemma = arch.is_gemma();
    Ok(ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: req_u(c, &format!("{a}.feed_forward_length"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta_f(c, &format!("{a}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        max_position_embeddings: meta_u(c, &format!("{a}.context_length"))?.unwrap_or(4096),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        qkv_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: c.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: c.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        qk_norm: c.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
        embed_scale: gemma.then(|| (hidden as f64).sqrt()),
        attn_softcap: meta_f(c, &format!("{a}.attn_logit_softcapping"))?,
        final_softcap: meta_f(c, &format!("{a}.final_logit_softcapping"))?,
        attn_scale: gguf_attention_scale(arch, num_layers, hidden, heads, head_dim),
        rope: Rope { theta, scaling },
        rope_local: (arch == Arch::Gemma3)
            .then_some(Rope { theta: 10_000.0, scaling: RopeScaling::None }),
        layers,
    })
}

/// GGUF has no `query_pre_attn_scalar`. As llama.cpp does, Gemma 2/3 27B
/// (46 and 62 layers) scale by (hidden / heads)^-½ (their query_pre_attn_scalar
/// is 144 and 168); every other model by head_dim^-½.
fn gguf_attention_scale(
    arch: Arch,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> f64 {
    let scalar = match (arch, layers) {
        (Arch::Gemma2, 46) | (Arch::Gemma3, 62) => hidden / heads,
        _ => head_dim,
    };
    (scalar as f64).powf(-0.5)
}

/// The llama.cpp name of a Hugging Face tensor name.
fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "post_attention_layernorm" if arch.is_gemma() => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{suffix}"))
}

/// Undoes llama.cpp's reordering of Llama q/k rows (its rope pairs adjacent
/// dimensions; transformers pairs the two halves of each head).
fn unpermute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, rows / heads / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

impl WeightSource for GgufSource {
    fn get(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        let Some(g) = gguf_name(self.arch, name) else { return Ok(None) };
        if !self.content.tensor_infos.contains_key(&g) {
            return Ok(None);
        }
        let q = self
            .content
            .tensor(&mut self.reader, &g, &Device::Cpu)
            .map_err(|e| ModelError::Gguf(format!("tensor `{g}`: {e}")))?;
        let t = q.dequantize(&Device::Cpu)?;
        let t = match (self.arch, name.rsplit('.').nth(1)) {
            (Arch::Llama, Some("q_proj")) => unpermute(&t, self.num_heads)?,
            (Arch::Llama, Some("k_proj")) => unpermute(&t, self.num_kv_heads)?,
            _ => t,
        };
        Ok(Some(t))
    }

    fn get_quantized(&mut self, name: &str) -> Result<Option<QuantData>, ModelError> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(g) = gguf_name(self.arch, name) else { return Ok(None) };
        let Some(info) = self.content.tensor_infos.get(&g) else { return Ok(None) };
        if !is_block_type(info.ggml_dtype) && !is_half(info.ggml_dtype) {
            return Ok(None);
        }
        let bad = |what: String| ModelError::Gguf(format!("tensor `{g}`: {what}"));
        let &[rows, cols] = info.shape.dims() else {
            return Err(bad(format!("a matrix was expected, the shape is {:?}", info.shape)));
        };
        let dtype = info.ggml_dtype;
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(bad(format!("{cols} columns do not fill {dtype:?} blocks")));
        }
        let len = rows * row_size(dtype, cols);
        let start = self.content.tensor_data_offset + info.offset;
        let mut bytes = vec![0u8; len];
        self.reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.reader.read_exact(&mut bytes))
            .map_err(|e| bad(format!("reading {len} bytes at offset {start}: {e}")))?;
        let data = QuantData { dtype, shape: (rows, cols), bytes: Stored::Owned(bytes) };
        let heads = match (self.arch, name.rsplit('.').nth(1)) {
            (Arch::Llama, Some("q_proj")) => self.num_heads,
            (Arch::Llama, Some("k_proj")) => self.num_kv_heads,
            _ => return Ok(Some(data)),
        };
        // Row for row what `unpermute` does to the dense tensor.
        let per_head = rows / heads;
        let half = per_head / 2;
        Ok(Some(data.permute_rows(|r| {
            let (h, within) = (r / per_head, r % per_head);
            h * per_head + 2 * (within % half) + within / half
        })?))
    }

    fn gemma_norms_offset(&self) -> bool {
        // llama.cpp's converter stores Gemma norms as 1 + w already.
        false
    }

    /// Of the whole file (`sha256sum` gives the same), read once through the
    /// source's reader before the tensors are.
    fn digest(&mut self) -> Result<[u8; 32], ModelError> {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek};
        let io = |e| ModelError::Gguf(format!("reading the file for its digest: {e}"));
        self.reader.rewind().map_err(io)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = self.reader.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finalize().into())
    }
}
