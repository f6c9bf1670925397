//! Where weights come from: a Hugging Face directory of safetensors shards
//! (memory-mapped) or a GGUF file. The model asks for tensors by their
//! Hugging Face names; a source translates.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use candle_core::{DType, Device, Tensor, quantized::GgmlDType, safetensors::MmapedSafetensors};

use super::{
    ModelError,
    quant::{QWeight, QuantData, Stored, is_half, type_name},
};

/// A source of named tensors.
pub(crate) trait WeightSource {
    /// The tensor called `name` (Hugging Face naming) on the CPU, or `None` if
    /// the source has no such tensor.
    fn get(&mut self, name: &str) -> Result<Option<Tensor>, ModelError>;

    /// Whether norm weights are stored as w in y = x̂ · (1 + w) (Gemma in HF
    /// checkpoints) rather than as the multiplier itself.
    fn gemma_norms_offset(&self) -> bool;

    /// SHA-256 of the weights as stored (see [`SafetensorsSource`] and the
    /// GGUF source for what exactly is hashed).
    fn digest(&mut self) -> Result<[u8; 32], ModelError>;

    /// The matrix called `name` as stored, if the source stores it in a block
    /// type ([`super::quant::is_block_type`]) or in bf16 or f16; `None` for
    /// another type or a missing one (ask [`Self::get`]).
    fn get_quantized(&mut self, _name: &str) -> Result<Option<QuantData>, ModelError> {
        Ok(None)
    }
}

/// Memory-mapped safetensors shards of a Hugging Face directory.
pub(crate) struct SafetensorsSource {
    st: Arc<MmapedSafetensors>,
    names: BTreeSet<String>,
    prefix: String,
    gemma: bool,
}

impl SafetensorsSource {
    /// Maps `model.safetensors`, or every shard named in
    /// `model.safetensors.index.json`.
    pub(crate) fn open(dir: &Path, gemma: bool) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Config(format!("{}: {e}", index.display())))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                ModelError::Config(format!("{}: no `weight_map`", index.display()))
            })?;
            let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            shards.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            if !f.exists() {
                return Err(ModelError::MissingFile(f.clone()));
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors
        // loader, we rely on them not being modified while the server runs.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(ModelError::Candle)?;
        let names: BTreeSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        // The language model of Gemma3ForConditionalGeneration sits under a
        // longer prefix (transformers 5: model.language_model.; 4.x:
        // language_model.model.).
        let prefix = ["model.language_model.", "language_model.model."]
            .into_iter()
            .find(|p| names.iter().any(|n| n.starts_with(p)))
            .unwrap_or("model.")
            .to_string();
        Ok(Self { st: Arc::new(st), names, prefix, gemma })
    }

    /// The name `name` (Hugging Face naming, `model.` prefix) has in the
    /// shards, or `None` if they have no such tensor.
    fn stored_name(&self, name: &str) -> Option<String> {
        let full = match name.strip_prefix("model.") {
            Some(rest) => format!("{}{rest}", self.prefix),
            None if name == "lm_head.weight" && self.prefix != "model." => {
                // Multimodal checkpoints keep the head at the top level or in
                // the language model.
                ["lm_head.weight", "language_model.lm_head.weight"]
                    .into_iter()
                    .find(|n| self.names.contains(*n))
                    .unwrap_or("lm_head.weight")
                    .to_string()
            }
            None => name.to_string(),
        };
        self.names.contains(&full).then_some(full)
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        let Some(full) = self.stored_name(name) else { return Ok(None) };
        Ok(Some(self.st.load(&full, &Device::Cpu)?))
    }

    /// A bf16 or f16 matrix, where it is mapped (no copy).
    fn get_quantized(&mut self, name: &str) -> Result<Option<QuantData>, ModelError> {
        let Some(full) = self.stored_name(name) else { return Ok(None) };
        let view = self.st.get(&full)?;
        let dtype = match view.dtype() {
            safetensors::Dtype::BF16 => GgmlDType::BF16,
            safetensors::Dtype::F16 => GgmlDType::F16,
            _ => return Ok(None),
        };
        let &[rows, cols] = view.shape() else { return Ok(None) };
        Ok(Some(QuantData {
            dtype,
            shape: (rows, cols),
            bytes: Stored::Mapped(self.st.clone(), full),
        }))
    }

    fn gemma_norms_offset(&self) -> bool {
        self.gemma
    }

    /// Over every tensor of the shards in name order: its name, a NUL byte,
    /// its dtype, its shape (u64 little-endian each) and its bytes, read
    /// where they are mapped (the loader then reads the same pages: the
    /// files are not read twice).
    fn digest(&mut self) -> Result<[u8; 32], ModelError> {
        use sha2::{Digest, Sha256};
        let mut tensors = self.st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = Sha256::new();
        for (name, view) in &tensors {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(format!("{:?}", view.dtype()).as_bytes());
            for &d in view.shape() {
                h.update((d as u64).to_le_bytes());
            }
            h.update(view.data());
        }
        Ok(h.finalize().into())
    }
}

/// Fetches tensors from a source, checks their shapes, and places them.
pub(crate) struct Loader<'a> {
    pub(crate) source: &'a mut dyn WeightSource,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// Whether block-quantized weights are kept as stored.
    pub(crate) keep_quantized: bool,
    pub(crate) bytes: usize,
    /// Elements of the weight matrices by the type they are kept in (`q4_k`,
    /// `f32`, …).
    pub(crate) matrix_types: BTreeMap<String, usize>,
}

impl Loader<'_> {
    fn fetch(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>, ModelError> {
        let Some(t) = self.source.get(name)? else { return Ok(None) };
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(Some(t))
    }

    /// A required weight in the compute dtype.
    pub(crate) fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.optional(name, shape)?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// An optional weight in the compute dtype.
    pub(crate) fn optional(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<Tensor>, ModelError> {
        let Some(t) = self.fetch(name, shape)? else { return Ok(None) };
        let t = t.to_dtype(self.dtype)?.to_device(&self.device)?;
        self.bytes += t.elem_count() * self.dtype.size_in_bytes();
        Ok(Some(t))
    }

    /// A [n, k] matrix kept as stored: `None` when the loader widens weights,
    /// or the source stores this one in f32, or in bf16 or f16 for a GPU
    /// (which computes in the compute dtype): then ask [`Self::weight`].
    pub(crate) fn quantized(
        &mut self,
        name: &str,
        shape: [usize; 2],
    ) -> Result<Option<QWeight>, ModelError> {
        if !self.keep_quantized {
            return Ok(None);
        }
        let Some(q) = self.source.get_quantized(name)? else { return Ok(None) };
        if is_half(q.dtype) && !self.device.is_cpu() {
            return Ok(None);
        }
        if q.shape != (shape[0], shape[1]) {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: vec![q.shape.0, q.shape.1],
            });
        }
        let w = QWeight::new(q, &self.device)?;
        self.bytes += w.size_in_bytes();
        *self.matrix_types.entry(type_name(w.dtype())).or_default() += shape[0] * shape[1];
        Ok(Some(w))
    }

    /// Notes a dense [n, k] weight matrix in the compute dtype.
    pub(crate) fn note_dense_matrix(&mut self, shape: [usize; 2]) {
        *self.matrix_types.entry(self.dtype.as_str().into()).or_default() += shape[0] * shape[1];
    }

    /// What the weight matrices are kept as, by element count, most first:
    /// `q4_k+q6_k`, `f32`, …
    pub(crate) fn matrix_types(&self) -> String {
        let mut v: Vec<(&String, &usize)> = self.matrix_types.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.into_iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join("+")
    }

    /// A norm weight as the f32 multiplier of the normalised activations
    /// (1 + w for Gemma checkpoints that store w).
    pub(crate) fn norm(&mut self, name: &str, dim: usize) -> Result<Tensor, ModelError> {
        let t =
            self.fetch(name, &[dim])?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let t = t.to_dtype(DType::F32)?;
        let t = if self.source.gemma_norms_offset() { (t + 1.0)? } else { t };
        self.bytes += dim * 4;
        Ok(t.to_device(&self.device)?)
    }
}
