//! Weights kept as the file stores them: a GGUF file's blocks (Q4_0 … Q8_0,
//! Q2_K … Q6_K), read into memory, and on the CPU a safetensors file's bf16
//! or f16 matrices, used where the file is mapped (no copy). Each matmul
//! widens the matrix it needs, for that call only.
//!
//! - On the CPU a matmul widens its matrix by bands of rows into one scratch
//!   buffer (in parallel) and multiplies each band as it is widened, with the
//!   f32 `gemm` candle's matmul calls ([`BandedMatmul`]): the answers are bit
//!   for bit those of `--dtype f32` (asserted on the fixtures and both real
//!   teachers), which match transformers, and no widened copy of a whole
//!   matrix ever exists. We do not use
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
    DType, Device, Module, Tensor,
    backend::BackendStorage,
    bail,
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
            // Mapped bf16/f16 values aligned to 2 bytes are used in place;
            // anything else is copied into a vector of the type.
            let blocks = match data.bytes {
                Stored::Mapped(..)
                    if is_half(data.dtype) && bytes.as_ptr().align_offset(2) == 0 =>
                {
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

    /// x Wᵀ for f32 x [.., k]: f32 [.., n]. On the CPU W is widened band by
    /// band for this call ([`BandedMatmul`]).
    pub(crate) fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Cpu(w) => w.matmul(x, BAND_VALUES),
            Self::Device(_, mm) => mm.forward(&x.to_dtype(DType::F32)?.contiguous()?),
        }
    }

    /// The rows `ids` of W, dequantised to f32: [ids, k] (an embedding
    /// lookup; dequantising is exact, as transformers' is).
    pub(crate) fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Cpu(w) => {
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * w.k];
                let (all, row) = (w.bytes()?, row_size(w.dtype, w.k));
                for (&id, out) in ids.iter().zip(out.chunks_mut(w.k.max(1))) {
                    let id = id as usize;
                    if id >= w.n {
                        bail!("row {id} of a {}-row embedding", w.n);
                    }
                    dequantize(w.dtype, &all[id * row..(id + 1) * row], out)?;
                }
                Tensor::from_vec(out, (ids.len(), w.k), &Device::Cpu)
            }
            Self::Device(t, _) => t.embedding(ids),
        }
    }
}

impl CpuBlocks {
    /// x Wᵀ, W widened by bands of about `band_values` values (see
    /// [`BandedMatmul`]).
    fn matmul(&self, x: &Tensor, band_values: usize) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&BandedMatmul { w: self, band_values })
    }

    /// All the bytes, row after row.
    fn bytes(&self) -> candle_core::Result<&[u8]> {
        match &self.blocks {
            // SAFETY: the blocks are the bytes of a Vec of the block type,
            // alive as long as `self`.
            Blocks::Owned(b) => {
                Ok(unsafe { std::slice::from_raw_parts(b.as_ptr(), b.storage_size_in_bytes()) })
            }
            Blocks::Mapped(m) => m.bytes(),
        }
    }

    /// The rows whose bytes are `bytes` dequantised into `out`, f32
    /// [rows, k], in parallel by bands of 64 rows.
    fn dequantize_into(&self, bytes: &[u8], out: &mut [f32]) -> candle_core::Result<()> {
        const BAND: usize = 64;
        let (k, row) = (self.k, row_size(self.dtype, self.k));
        out.par_chunks_mut(BAND * k)
            .zip(bytes.par_chunks(BAND * row))
            .try_for_each(|(out, bytes)| dequantize(self.dtype, bytes, out))
    }
}

/// Values of W widened at a time: 2 Mi (8 MiB of f32, within the L3 cache of
/// the CPUs we measured), and at least as many rows as x has, so that x,
/// which `gemm` packs once per band, is not packed more often than W's
/// values are written.
const BAND_VALUES: usize = 2 << 20;

/// x Wᵀ on the CPU for f32 x [.., k] and a kept W [n, k]: W is widened by
/// bands of rows into one scratch buffer, each band multiplied at once by
/// the `gemm` candle's f32 matmul calls, with the same arguments. No widened
/// copy of the whole matrix exists, and the band is still in the cache when
/// `gemm` reads it.
struct BandedMatmul<'a> {
    w: &'a CpuBlocks,
    /// [`BAND_VALUES`] but in tests.
    band_values: usize,
}

impl candle_core::CustomOp1 for BandedMatmul<'_> {
    fn name(&self) -> &'static str {
        "banded-quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (n, k) = (self.w.n, self.w.k);
        let candle_core::CpuStorage::F32(x) = storage else {
            bail!("a kept matrix multiplies f32 activations, not {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("the activations of a kept matrix must be contiguous");
        };
        let dims = layout.dims();
        if dims.last() != Some(&k) {
            bail!("activations of shape {dims:?} against a matrix of {k} columns");
        }
        let x = &x[start..end];
        let m = x.len() / k.max(1);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = n;
        let shape = candle_core::Shape::from_dims(&shape);
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 || k == 0 {
            return Ok((candle_core::CpuStorage::F32(out), shape));
        }
        let band = (self.band_values / k).max(m).next_multiple_of(16).min(n);
        let (all, row) = (self.w.bytes()?, row_size(self.w.dtype, k));
        let mut scratch = vec![0f32; band * k];
        let threads = candle_core::utils::get_num_threads();
        let parallelism =
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for r0 in (0..n).step_by(band) {
            let r1 = (r0 + band).min(n);
            let width = r1 - r0;
            let buf = &mut scratch[..width * k];
            self.w.dequantize_into(&all[r0 * row..r1 * row], buf)?;
            // SAFETY: dst is out's columns r0..r1 of m rows of n (row stride
            // n), x is m × k contiguous, the band width × k contiguous; all
            // within their buffers, and dst is written by this call only.
            unsafe {
                gemm::gemm(
                    m,
                    width,
                    k,
                    out.as_mut_ptr().add(r0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    buf.as_ptr(),
                    // The band [width, k] as rhs [k, width] (its transpose).
                    k as isize,
                    1,
                    0f32,
                    1f32,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        Ok((candle_core::CpuStorage::F32(out), shape))
    }
}

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

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
