//! The teacher: its weights on one device (loaded from a Hugging Face
//! directory or a GGUF file), the forward over a packed batch (embedding,
//! decoder layers, final norm) and the LM head.

use std::{path::Path, time::Instant};

use candle_core::{DType, Device, Tensor};

use super::{
    ModelConfig, ModelError, PackedBatch,
    attention_cpu::DEFAULT_QUERY_BLOCK,
    layers::{Forward, Layer, Matrix, rms_norm, softcap},
    plan::{AttentionPlan, DEFAULT_ATTENTION_TILE_ELEMENTS},
    rope::RopeTables,
    weights::{Loader, WeightSource},
};

/// The teacher model, owning its weights on one device.
pub struct Teacher {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    /// [vocab, hidden].
    embed: Matrix,
    /// [vocab, hidden]; `None`: tied to the embedding.
    lm_head: Option<Matrix>,
    /// What the weight matrices are kept as (`q4_k+q6_k`, `f32`, …).
    matrix_types: String,
    final_norm: Tensor,
    layers: Vec<Layer>,
    rope: RopeTables,
    /// Scores per attention tile, at most ([`DEFAULT_ATTENTION_TILE_ELEMENTS`]).
    attention_tile_elements: usize,
    /// Query rows per work item of the fused CPU attention; `None`: tiles.
    fused_query_block: Option<usize>,
    /// SHA-256 of the weights as loaded (hex; empty when not loaded from files).
    weights_sha256: String,
}

/// Whether the fused CPU kernels (attention, SiLU · up) run: f32 on the CPU.
fn cpu_f32(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

impl Teacher {
    /// Loads a teacher from a Hugging Face directory (config.json and
    /// safetensors) or a `.gguf` file, every weight widened (or narrowed) to
    /// `dtype`, on `device`.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        Self::load_with(path, device, Some(dtype), false)
    }

    /// Loads a teacher keeping its matrices as the file stores them (see
    /// `quant.rs`): a GGUF file's quantized blocks, and on the CPU bf16 or f16
    /// matrices (of safetensors or GGUF); activations and the other tensors
    /// in f32. On the CPU a file of f32 matrices loads as [`Self::load`] in
    /// f32. On a GPU a Hugging Face directory computes in the dtype it
    /// stores (bf16 or f16; bf16 for an f32 checkpoint): see
    /// [`kept_compute_dtype`].
    pub fn load_kept(path: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(path, device, None, true)
    }

    /// `dtype` `None`: the one [`kept_compute_dtype`] picks from the source.
    fn load_with(
        path: &Path,
        device: &Device,
        dtype: Option<DType>,
        keep_quantized: bool,
    ) -> Result<Self, ModelError> {
        let started = Instant::now();
        let (config, mut source) = super::load::open(path)?;
        let dtype = match dtype {
            Some(d) => d,
            None => kept_compute_dtype(source.as_mut(), path.is_dir(), device.is_cpu())?,
        };
        tracing::info!(
            path = %path.display(),
            arch = config.arch.name(),
            layers = config.num_layers(),
            hidden = config.hidden_size,
            vocab = config.vocab_size,
            dtype = ?dtype,
            keep_quantized,
            cpu_simd = crate::kernels::simd_build(),
            "loading teacher"
        );
        let digest = source.digest()?;
        let mut l = Loader {
            source: source.as_mut(),
            device: device.clone(),
            dtype,
            keep_quantized,
            bytes: 0,
            matrix_types: Default::default(),
        };
        let mut teacher = Self::from_source(config, &mut l)?;
        teacher.weights_sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "teacher loaded");
        Ok(teacher)
    }

    fn from_source(config: ModelConfig, l: &mut Loader) -> Result<Self, ModelError> {
        let c = &config;
        let (device, dtype) = (l.device.clone(), l.dtype);
        let (h, v) = (c.hidden_size, c.vocab_size);
        let embed = Matrix::load(l, "model.embed_tokens.weight", [v, h], false)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            // Some checkpoints mark embeddings untied yet ship no head; fall
            // back to the embedding as transformers does when it ties them.
            Matrix::optional(l, "lm_head.weight", [v, h], false)?
        };
        let mut layers = Vec::with_capacity(c.num_layers());
        for (i, kind) in c.layers.iter().enumerate() {
            let started = Instant::now();
            let layer = Layer::load(l, c, i, kind)?;
            tracing::debug!(layer = i, seconds = started.elapsed().as_secs_f64(), "layer loaded");
            layers.push(layer);
        }
        let final_norm = l.norm("model.norm.weight", h)?;
        tracing::info!(bytes = l.bytes, "weights placed on {:?}", device.location());
        let rope = RopeTables::new(c, &device);
        Ok(Self {
            config,
            device: device.clone(),
            dtype,
            embed,
            lm_head,
            matrix_types: l.matrix_types(),
            final_norm,
            layers,
            rope,
            attention_tile_elements: DEFAULT_ATTENTION_TILE_ELEMENTS,
            // The fused kernel is CPU and f32 only; elsewhere the tiles.
            fused_query_block: cpu_f32(&device, dtype).then_some(DEFAULT_QUERY_BLOCK),
            weights_sha256: String::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The compute dtype (of the activations, and of the weights not kept
    /// quantized).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// What the weight matrices (linear layers, embedding, head) are kept
    /// as, by element count, most first: `q4_k+q6_k` for a Q4_K_M file kept
    /// quantized, else the compute dtype (`f32`, `bf16`).
    pub fn matrix_types(&self) -> &str {
        &self.matrix_types
    }

    /// What is served, as `ModelInfo.dtype` says it: the compute dtype when
    /// every matrix is in it (`f32`, `bf16`), else the matrices' types and
    /// the activations' (`q4_k+q6_k/f32-acc`).
    pub fn served_dtype(&self) -> String {
        let compute = self.dtype.as_str();
        if self.matrix_types == compute {
            compute.to_string()
        } else {
            format!("{}/{compute}-acc", self.matrix_types)
        }
    }

    /// SHA-256 (hex) of the weights it was loaded from: of a GGUF file, the
    /// file's; of safetensors shards, over every tensor in name order (name,
    /// NUL, dtype, shape as u64 LE, bytes).
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Attention is computed in tiles of at most `elements` scores (heads ×
    /// query rows × keys; a tile holds at least one query row whatever the
    /// bound). The default, [`DEFAULT_ATTENTION_TILE_ELEMENTS`], is what the
    /// server uses; tests set small bounds to run many tiles per sequence.
    pub fn set_attention_tile_elements(&mut self, elements: usize) {
        self.attention_tile_elements = elements.max(1);
    }

    /// The bound on scores per attention tile.
    pub fn attention_tile_elements(&self) -> usize {
        self.attention_tile_elements
    }

    /// On the CPU in f32, attention runs fused (see
    /// [`PackedCausalAttention`](super::attention_cpu::PackedCausalAttention))
    /// in blocks of `query_block` query rows (at least 1; the server uses
    /// [`DEFAULT_QUERY_BLOCK`]); `None` makes it run in tiles of tensor ops as
    /// on a GPU, which tests use to compare the two. An error on a GPU or in
    /// another dtype, where only the tiles run.
    pub fn set_fused_cpu_attention(
        &mut self,
        query_block: Option<usize>,
    ) -> Result<(), ModelError> {
        if query_block.is_some() && !cpu_f32(&self.device, self.dtype) {
            return Err(ModelError::Config(format!(
                "the fused attention runs on the CPU in f32 only, not on {:?} in {:?}",
                self.device.location(),
                self.dtype
            )));
        }
        self.fused_query_block = query_block.map(|b| b.max(1));
        Ok(())
    }

    /// The fused CPU attention's query rows per work item, if it runs.
    pub fn fused_cpu_attention(&self) -> Option<usize> {
        self.fused_query_block
    }

    /// Whether a forward shares prefixes ([`PackedBatch::sharing_prefixes`])
    /// in its attention: with the fused CPU kernel. Otherwise (the tiles a GPU
    /// runs) a batch that shares a prefix is run unshared, to the same result.
    pub fn shares_prefixes(&self) -> bool {
        self.fused_query_block.is_some()
    }

    /// Runs the packed batch through the model: the final-normed hidden states
    /// [tokens, hidden] in the compute dtype, a row per packed token.
    pub fn hidden_states(&self, batch: &PackedBatch) -> Result<Tensor, ModelError> {
        if batch.shares_prefixes() && !self.shares_prefixes() {
            let (flat, rows) = batch.unshared()?;
            let hidden = self.hidden_states(&flat)?;
            let rows = Tensor::from_vec(rows, batch.num_tokens(), &self.device)?;
            return Ok(hidden.index_select(&rows, 0)?);
        }
        let c = &self.config;
        if let Some((i, &t)) =
            batch.tokens().iter().enumerate().find(|(_, t)| **t as usize >= c.vocab_size)
        {
            return Err(ModelError::Batch(format!(
                "token {i} of the packed batch is {t}, outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let n = batch.num_tokens();
        let ids = Tensor::from_slice(batch.tokens(), n, &self.device)?;
        let mut x = self.embed.rows(&ids)?.to_dtype(self.dtype)?;
        if let Some(scale) = c.embed_scale {
            // transformers multiplies by the scale rounded to the compute dtype.
            let s = Tensor::new(scale as f32, &self.device)?.to_dtype(self.dtype)?;
            x = x.broadcast_mul(&s)?;
        }
        let positions = batch.positions();
        let global = self.rope.tables(&positions, false)?;
        let local = match self.rope.has_local() {
            true => Some(self.rope.tables(&positions, true)?),
            false => None,
        };
        let mut windows: Vec<Option<usize>> = self.layers.iter().map(|l| l.window).collect();
        windows.sort();
        windows.dedup();
        let plan = AttentionPlan::new(
            batch,
            &windows,
            c.num_heads,
            self.attention_tile_elements,
            &self.device,
            self.fused_query_block.is_none(),
        )?;
        let forward = Forward {
            config: c,
            dtype: self.dtype,
            fused_query_block: self.fused_query_block,
            cpu_f32: cpu_f32(&self.device, self.dtype),
        };
        for layer in &self.layers {
            let rope = match (&local, layer.local_rope) {
                (Some(local), true) => local,
                _ => &global,
            };
            x = layer.forward(&forward, &x, rope, &plan)?;
        }
        Ok(rms_norm(&x, &self.final_norm, c.rms_norm_eps)?)
    }

    /// Logits [rows, V] in f32 for the given hidden-state rows (final soft-cap
    /// applied).
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.head_matmul(hidden_rows)?.to_dtype(DType::F32)?;
        Ok(softcap(&logits, self.config.final_softcap)?)
    }

    /// The LM head's logits [rows, V] of `hidden_rows` as the sampler backend
    /// reads them: straight from the matmul in the compute dtype, or in f32
    /// when a final soft-cap applies. Widened to f32 they are exactly
    /// [`Self::logits`] (widening is exact).
    pub fn head_logits(&self, hidden_rows: &Tensor) -> Result<Tensor, ModelError> {
        if self.config.final_softcap.is_some() {
            return self.logits(hidden_rows);
        }
        Ok(self.head_matmul(hidden_rows)?)
    }

    /// hidden_rows × the head (the embedding when tied), before any soft-cap.
    fn head_matmul(&self, hidden_rows: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.as_ref().unwrap_or(&self.embed).matmul_t(hidden_rows)
    }
}

/// The compute dtype of [`Teacher::load_kept`]: f32 on the CPU and for a GGUF
/// file (quantized matmuls take f32 activations); on a GPU, for a Hugging
/// Face directory (`hf_dir`), the dtype its embedding is stored in when that
/// is f16 (what the file stores is what is served), else bf16.
fn kept_compute_dtype(
    source: &mut dyn WeightSource,
    hf_dir: bool,
    cpu: bool,
) -> Result<DType, ModelError> {
    if cpu || !hf_dir {
        return Ok(DType::F32);
    }
    let stored = source.get_quantized("model.embed_tokens.weight")?.map(|q| q.dtype);
    Ok(match stored {
        Some(candle_core::quantized::GgmlDType::F16) => DType::F16,
        _ => DType::BF16,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::DType;

    /// What a GPU would compute a kept checkpoint in, decided from the files
    /// (the device only has to be other than the CPU, so this runs here).
    #[test]
    fn a_gpu_computes_a_kept_checkpoint_in_its_stored_half_dtype() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let pick = |p: &str, cpu: bool| {
            let path = fixtures.join(p);
            let (_, mut source) = super::super::load::open(&path).unwrap();
            super::kept_compute_dtype(source.as_mut(), path.is_dir(), cpu).unwrap()
        };
        assert_eq!(pick("half/qwen3_f16", false), DType::F16);
        assert_eq!(pick("half/llama_bf16", false), DType::BF16);
        assert_eq!(pick("tiny/llama", false), DType::BF16, "an f32 checkpoint computes in bf16");
        assert_eq!(pick("gguf/llama_q4_0.gguf", false), DType::F32, "GGUF: f32 activations");
        assert_eq!(pick("half/qwen3_f16", true), DType::F32, "the CPU: f32 activations");
    }
}
