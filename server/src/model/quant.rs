//! Weights kept as the file stores them: a GGUF file's blocks (Q4_0 … Q8_0,
//! Q2_K … Q6_K), read into memory, and on the CPU a safetensors file's bf16
//! or f16 matrices, used where the file is mapped (no copy). Each matmul
//! widens the matrix it needs, for that call only.
//!
//! - On the CPU a linear layer dequantises its matrix (in parallel, into the
//!   transposed [in, out] layout the f32 path keeps) and runs the same f32
//!   `gemm` as `--dtype f32`: the answers are bit for bit those of the f32
//!   path, which matches transformers, and the transient f32 copy is one
//!   matrix at a time (the LM head goes by chunks of rows). We do not use
//!   candle's `QMatMul` here: its int8 dot products round every activation
//!   row to 8 bits per block (measured through SmolLM2 and Gemma 3: up to
//!   0.7 and 2.1 nats off transformers' log-probabilities), are 6× slower
//!   than `gemm` at 600 tokens on an AVX2 CPU, and its x86 path keeps a
//!   second, repacked copy of every Q4_K/Q6_K matrix (about 2.3× the file).
//! - On CUDA, candle's `QMatMul` and its quantized kernels.
//! - The embedding dequantises only the rows it looks up (exact).
//!
//! Activations stay f32: norms, RoPE, the fused attention and SiLU run as in
//! the f32 path.

use std::{borrow::Cow, sync::Arc};

use candle_core::{
    DType, Device, Module, Tensor, bail,
    quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType, k_quants},
    safetensors::MmapedSafetensors,
};
use rayon::prelude::*;

/// A tensor kept as stored: its type, its [rows, columns] shape and its
/// blocks (or half-precision values), row after row.
pub(crate) struct QuantData {
    pub(crate) dtype: GgmlDType,
    pub(crate) shape: (usize, usize),
    pub(crate) bytes: Stored,
}

/// Where a kept tensor's bytes are.
#[derive(Clone)]
pub(crate) enum Stored {
    /// Read into memory (a GGUF tensor).
    Owned(Vec<u8>),
    /// Where a safetensors file is mapped: the tensor `name` of `map`.
    Mapped(Arc<MmapedSafetensors>, String),
}

impl Stored {
    /// The bytes.
    pub(crate) fn bytes(&self) -> candle_core::Result<&[u8]> {
        match self {
            Self::Owned(v) => Ok(v),
            Self::Mapped(map, name) => Ok(map.get(name)?.data()),
        }
    }
}

/// Bytes of a row of `cols` values of block type `dtype` (`cols` a multiple
/// of the block size).
pub(crate) fn row_size(dtype: GgmlDType, cols: usize) -> usize {
    cols / dtype.block_size() * dtype.type_size()
}

impl QuantData {
    /// The rows reordered: row `r` of the result is row `from(r)` of `self`.
    pub(crate) fn permute_rows(self, from: impl Fn(usize) -> usize) -> candle_core::Result<Self> {
        let rb = row_size(self.dtype, self.shape.1);
        let old = self.bytes.bytes()?;
        let mut bytes = Vec::with_capacity(old.len());
        for r in 0..self.shape.0 {
            let s = from(r);
            bytes.extend_from_slice(&old[s * rb..(s + 1) * rb]);
        }
        Ok(Self { bytes: Stored::Owned(bytes), ..self })
    }
}

/// Whether logitd keeps a GGUF file's tensors of this type quantized (the
/// block types); its F32, F16 and BF16 tensors are loaded as dense tensors.
pub(crate) fn is_block_type(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Whether `dtype` is bf16 or f16 (kept on the CPU, widened per matmul).
pub(crate) fn is_half(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F16 | GgmlDType::BF16)
}

/// The lower-case name llama.cpp gives a type (`q4_k`, `q8_0`, …).
pub(crate) fn type_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}").to_lowercase().replace("k", "_k")
}

/// A quantized [n, k] weight W for y = x Wᵀ.
#[derive(Clone)]
pub(crate) enum QWeight {
    /// On the CPU: the blocks.
    Cpu(Arc<CpuBlocks>),
    /// On a GPU: candle's quantized tensor and its matmul.
    Device(Arc<QTensor>, QMatMul),
}

/// A quantized (or half-precision) matrix in memory on the CPU.
pub(crate) struct CpuBlocks {
    blocks: Blocks,
    dtype: GgmlDType,
    n: usize,
    k: usize,
}

/// A CPU matrix's bytes.
enum Blocks {
    /// Copied into a vector of the block type (aligned as it must be).
    Owned(Box<dyn QuantizedType>),
    /// Where the file is mapped (already aligned for the type).
    Mapped(Stored),
}

impl QWeight {
    /// Places `data` on `device`.
    pub(crate) fn new(data: QuantData, device: &Device) -> candle_core::Result<Self> {
        let (n, k) = data.shape;
        let block = data.dtype.block_size();
        let bytes = data.bytes.bytes()?;
        if !k.is_multiple_of(block) || bytes.len() != n * row_size(data.dtype, k) {
            bail!("a {:?} tensor of shape [{n}, {k}] cannot be {} bytes", data.dtype, bytes.len());
        }
        if device.is_cpu() {
            // Mapped bytes aligned for the type are used in place; anything
            // else is copied into a vector of the type.
            let align = if is_half(data.dtype) { 2 } else { block_align(data.dtype) };
            let blocks = match data.bytes {
                Stored::Mapped(..) if bytes.as_ptr().align_offset(align) == 0 => {
                    Blocks::Mapped(data.bytes.clone())
                }
                _ => Blocks::Owned(data.dtype.from_data(Cow::Borrowed(bytes))),
            };
            return Ok(Self::Cpu(Arc::new(CpuBlocks { blocks, dtype: data.dtype, n, k })));
        }
        let storage = QStorage::from_data(Cow::Borrowed(bytes), device, data.dtype)?;
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
            Self::Cpu(w) => w.n * row_size(w.dtype, w.k),
            Self::Device(t, _) => t.storage_size_in_bytes(),
        }
    }

    /// x Wᵀ for f32 x [.., k]: f32 [.., n]. On the CPU W is widened for this
    /// call, transposed, and multiplied as the f32 path does.
    pub(crate) fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Cpu(w) => x.matmul(&w.dequantize_t(0..w.n)?),
            Self::Device(_, mm) => mm.forward(&x.to_dtype(DType::F32)?.contiguous()?),
        }
    }

    /// x Wᵀ like [`Self::matmul_t`], W widened `rows` rows at a time and
    /// multiplied as the f32 path multiplies its LM head, x · (W rows)ᵀ with the
    /// rows untransposed (the head: its f32 copy would be as large as the
    /// vocabulary × hidden).
    pub(crate) fn matmul_t_chunked(&self, x: &Tensor, rows: usize) -> candle_core::Result<Tensor> {
        let Self::Cpu(w) = self else { return self.matmul_t(x) };
        let rows = rows.max(1);
        let mut parts = Vec::with_capacity(w.n.div_ceil(rows));
        for start in (0..w.n).step_by(rows) {
            let end = (start + rows).min(w.n);
            parts.push(x.matmul(&w.dequantize(start..end)?.t()?)?);
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Tensor::cat(&parts, candle_core::D::Minus1)
    }

    /// The rows `ids` of W, dequantised to f32: [ids, k] (an embedding
    /// lookup; dequantising is exact, as transformers' is).
    pub(crate) fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Cpu(w) => {
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * w.k];
                for (&id, out) in ids.iter().zip(out.chunks_mut(w.k.max(1))) {
                    let id = id as usize;
                    if id >= w.n {
                        bail!("row {id} of a {}-row embedding", w.n);
                    }
                    dequantize(w.dtype, w.row_bytes(id..id + 1)?, out)?;
                }
                Tensor::from_vec(out, (ids.len(), w.k), &Device::Cpu)
            }
            Self::Device(t, _) => t.embedding(ids),
        }
    }
}

impl CpuBlocks {
    /// The bytes of rows `rows`.
    fn row_bytes(&self, rows: std::ops::Range<usize>) -> candle_core::Result<&[u8]> {
        let row = row_size(self.dtype, self.k);
        let all = match &self.blocks {
            // SAFETY: the blocks are the bytes of a Vec of the block type,
            // alive as long as `self`.
            Blocks::Owned(b) => unsafe {
                std::slice::from_raw_parts(b.as_ptr(), b.storage_size_in_bytes())
            },
            Blocks::Mapped(m) => m.bytes()?,
        };
        Ok(&all[rows.start * row..rows.end * row])
    }

    /// Rows `rows` of W dequantised: f32 [rows, k], in parallel by bands of
    /// 64 rows.
    fn dequantize(&self, rows: std::ops::Range<usize>) -> candle_core::Result<Tensor> {
        const BAND: usize = 64;
        let (k, n) = (self.k, rows.len());
        let bytes = self.row_bytes(rows)?;
        let row = row_size(self.dtype, k);
        let mut out = vec![0f32; n * k];
        out.par_chunks_mut(BAND * k)
            .zip(bytes.par_chunks(BAND * row))
            .try_for_each(|(out, bytes)| dequantize(self.dtype, bytes, out))?;
        Tensor::from_vec(out, (n, k), &Device::Cpu)
    }

    /// Rows `rows` of W dequantised and transposed: f32 [k, rows], contiguous.
    fn dequantize_t(&self, rows: std::ops::Range<usize>) -> candle_core::Result<Tensor> {
        let (k, n) = (self.k, rows.len());
        let row_bytes = row_size(self.dtype, k);
        let bytes = self.row_bytes(rows)?;
        // Row bands of 16: each dequantised into a small buffer, then written
        // into its 16 columns of the [k, n] result.
        const BAND: usize = 16;
        let mut out = vec![0f32; k * n];
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..n.div_ceil(BAND)).into_par_iter().try_for_each(|band| {
            let r0 = band * BAND;
            let r1 = (r0 + BAND).min(n);
            let mut buf = vec![0f32; (r1 - r0) * k];
            dequantize(self.dtype, &bytes[r0 * row_bytes..r1 * row_bytes], &mut buf)?;
            let out = out_ptr;
            let width = r1 - r0;
            for c in 0..k {
                // SAFETY: columns r0..r1 of the result belong to this band
                // alone, and c * n + r1 <= k * n.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(c * n + r0), width) };
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = buf[i * k + c];
                }
            }
            Ok::<(), candle_core::Error>(())
        })?;
        Tensor::from_vec(out, (k, n), &Device::Cpu)
    }
}

/// A pointer the row bands write through (each to columns of its own).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the bands write disjoint elements; the buffer outlives them.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Dequantises whole blocks of `dtype` in `bytes` into `out`.
fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> candle_core::Result<()> {
    fn go<T: GgmlType>(bytes: &[u8], out: &mut [f32]) -> candle_core::Result<()> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size)
            || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0
        {
            bail!("{} bytes at {:p} are not whole aligned blocks", bytes.len(), bytes.as_ptr());
        }
        // SAFETY: length and alignment checked; every bit pattern is a valid
        // block (integers and f16).
        let blocks =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
        T::to_float(blocks, out);
        Ok(())
    }
    use k_quants::*;
    match dtype {
        GgmlDType::Q4_0 => go::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => go::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => go::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => go::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => go::<BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => go::<BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => go::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => go::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => go::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => go::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => go::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => go::<BlockQ8K>(bytes, out),
        GgmlDType::BF16 => half_to_f32::<half::bf16>(bytes, out),
        GgmlDType::F16 => half_to_f32::<half::f16>(bytes, out),
        other => bail!("{other:?} is not a block type"),
    }
}

/// bf16 or f16 values in `bytes` widened into `out` (exact; the slice
/// conversion uses the CPU's vector instructions where it has them).
fn half_to_f32<T>(bytes: &[u8], out: &mut [f32]) -> candle_core::Result<()>
where
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    const { assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2) };
    if !bytes.len().is_multiple_of(2) || bytes.as_ptr().align_offset(2) != 0 {
        bail!("{} bytes at {:p} are not aligned 16-bit values", bytes.len(), bytes.as_ptr());
    }
    // SAFETY: T is bf16 or f16 (two bytes, aligned 2, any bit pattern valid);
    // length and alignment are checked.
    let values = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / 2) };
    if values.len() != out.len() {
        bail!("{} values for {} outputs", values.len(), out.len());
    }
    values.convert_to_f32_slice(out);
    Ok(())
}

/// The alignment of `dtype`'s block struct.
fn block_align(dtype: GgmlDType) -> usize {
    use k_quants::*;
    match dtype {
        GgmlDType::Q4_0 => std::mem::align_of::<BlockQ4_0>(),
        GgmlDType::Q4_1 => std::mem::align_of::<BlockQ4_1>(),
        GgmlDType::Q5_0 => std::mem::align_of::<BlockQ5_0>(),
        GgmlDType::Q5_1 => std::mem::align_of::<BlockQ5_1>(),
        GgmlDType::Q8_0 => std::mem::align_of::<BlockQ8_0>(),
        GgmlDType::Q8_1 => std::mem::align_of::<BlockQ8_1>(),
        GgmlDType::Q2K => std::mem::align_of::<BlockQ2K>(),
        GgmlDType::Q3K => std::mem::align_of::<BlockQ3K>(),
        GgmlDType::Q4K => std::mem::align_of::<BlockQ4K>(),
        GgmlDType::Q5K => std::mem::align_of::<BlockQ5K>(),
        GgmlDType::Q6K => std::mem::align_of::<BlockQ6K>(),
        GgmlDType::Q8K => std::mem::align_of::<BlockQ8K>(),
        _ => std::mem::align_of::<f32>(),
    }
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
