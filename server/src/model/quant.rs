//! GGUF weights kept as the file stores them (Q4_0 … Q8_0, Q2_K … Q6_K): a
//! linear layer multiplies by the quantized blocks, the embedding dequantises
//! only the rows it looks up, and the LM head is a quantized matmul like every
//! other linear layer.
//!
//! - On the CPU the matmul is candle's `k_quants::matmul` (through
//!   `QuantizedType::matmul_t`): each activation row is quantized to the
//!   weight type's dot-product type (Q8_0, Q8_1 or Q8_K, as in llama.cpp), the
//!   block dot products run in integers, and the sums in f32. We call it through
//!   our own op rather than `QMatMul`, whose x86 path keeps a second, repacked
//!   copy of every Q4_K/Q6_K weight (6 and 10 bits a weight on top of the 4.5
//!   and 6.6 stored): about 2.3× the file in memory, where a teacher that fits
//!   a machine is the point.
//! - On CUDA, candle's `QMatMul` and its quantized kernels.
//!
//! Activations stay f32 between layers: norms, RoPE, the fused attention and
//! SiLU run as in the f32 path.

use std::{borrow::Cow, sync::Arc};

use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor,
    backend::BackendStorage,
    bail,
    quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType},
};

/// A quantized tensor as read from a file: its type, its [rows, columns]
/// shape and its blocks, row after row.
pub(crate) struct QuantData {
    pub(crate) dtype: GgmlDType,
    pub(crate) shape: (usize, usize),
    pub(crate) bytes: Vec<u8>,
}

impl QuantData {
    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        self.shape.1 / self.dtype.block_size() * self.dtype.type_size()
    }

    /// The rows reordered: row `r` of the result is row `from(r)` of `self`.
    pub(crate) fn permute_rows(self, from: impl Fn(usize) -> usize) -> Self {
        let rb = self.row_bytes();
        let mut bytes = Vec::with_capacity(self.bytes.len());
        for r in 0..self.shape.0 {
            let s = from(r);
            bytes.extend_from_slice(&self.bytes[s * rb..(s + 1) * rb]);
        }
        Self { bytes, ..self }
    }
}

/// Whether logitd keeps tensors of this type quantized (the block types);
/// F32, F16 and BF16 tensors are loaded as dense tensors.
pub(crate) fn is_block_type(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The lower-case name llama.cpp gives a type (`q4_k`, `q8_0`, …).
pub(crate) fn type_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}").to_lowercase().replace("k", "_k")
}

/// A quantized [n, k] weight W for y = x Wᵀ.
#[derive(Clone)]
pub(crate) enum QWeight {
    /// On the CPU: the blocks, multiplied by [`CpuQMatMul`].
    Cpu(Arc<CpuQMatMul>),
    /// On a GPU: candle's quantized tensor and its matmul.
    Device(Arc<QTensor>, QMatMul),
}

/// The CPU matmul by a quantized weight (a custom op, so it reads the
/// activations where they are).
pub(crate) struct CpuQMatMul {
    blocks: Box<dyn QuantizedType>,
    dtype: GgmlDType,
    n: usize,
    k: usize,
}

impl QWeight {
    /// Places `data` on `device`.
    pub(crate) fn new(data: QuantData, device: &Device) -> candle_core::Result<Self> {
        let (n, k) = data.shape;
        let block = data.dtype.block_size();
        if k % block != 0 || data.bytes.len() != n * k / block * data.dtype.type_size() {
            bail!(
                "a {:?} tensor of shape [{n}, {k}] cannot be {} bytes",
                data.dtype,
                data.bytes.len()
            );
        }
        if device.is_cpu() {
            let blocks = data.dtype.from_data(Cow::Owned(data.bytes));
            return Ok(Self::Cpu(Arc::new(CpuQMatMul { blocks, dtype: data.dtype, n, k })));
        }
        let storage = QStorage::from_data(Cow::Owned(data.bytes), device, data.dtype)?;
        let t = Arc::new(QTensor::new(storage, (n, k))?);
        let mm = QMatMul::from_arc(t.clone())?;
        Ok(Self::Device(t, mm))
    }

    /// The type of the blocks.
    pub(crate) fn dtype(&self) -> GgmlDType {
        match self {
            Self::Cpu(w) => w.dtype,
            Self::Device(t, _) => t.dtype(),
        }
    }

    /// Bytes held.
    pub(crate) fn size_in_bytes(&self) -> usize {
        match self {
            Self::Cpu(w) => w.blocks.storage_size_in_bytes(),
            Self::Device(t, _) => t.storage_size_in_bytes(),
        }
    }

    /// x Wᵀ for f32 x [.., k]: f32 [.., n].
    pub(crate) fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        match self {
            Self::Cpu(w) => x.apply_op1_no_bwd(w.as_ref()),
            Self::Device(_, mm) => mm.forward(&x),
        }
    }

    /// The rows `ids` of W, dequantised to f32: [ids, k] (an embedding
    /// lookup; dequantising is exact, as transformers' is).
    pub(crate) fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Cpu(w) => {
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= w.n) {
                    bail!("row {bad} of a {}-row embedding", w.n);
                }
                match w.blocks.embedding(&ids, w.n, w.k)? {
                    CpuStorage::F32(v) => Tensor::from_vec(v, (ids.len(), w.k), &Device::Cpu),
                    other => bail!("embedding rows came back as {:?}", other.dtype()),
                }
            }
            Self::Device(t, _) => t.embedding(ids),
        }
    }
}

impl CustomOp1 for CpuQMatMul {
    fn name(&self) -> &'static str {
        "logitd-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("logitd-qmatmul: the activations are not contiguous");
        };
        let CpuStorage::F32(x) = storage else {
            bail!("logitd-qmatmul: activations are {:?}, not f32", storage.dtype());
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.pop() != Some(self.k) {
            bail!(
                "logitd-qmatmul: activations {:?} against a weight of [{}, {}]",
                layout.shape(),
                self.n,
                self.k
            );
        }
        let m: usize = dims.iter().product();
        dims.push(self.n);
        let mut dst = vec![0f32; m * self.n];
        if m > 0 {
            self.blocks.matmul_t((m, self.k, self.n), &x[start..end], &mut dst)?;
        }
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
