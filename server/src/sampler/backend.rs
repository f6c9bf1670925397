//! The sampler backend: built once from the device, it sends hidden-state rows
//! through the model's LM head in row chunks and samples each chunk, on the
//! CPU with [`CpuSampler`] or, on a CUDA device, with the kernel where the
//! logits are. It owns the LM-head chunking, the kernel's shared-memory fit
//! check and the CPU fallback. It may not touch the model's weights or its
//! forward: it sees the model only through [`LmHead`].

use candle_core::{DType, Device, Tensor};

use super::{CpuSampler, RowKey, SampledRows, SamplingParams};
use crate::model::ModelError;

/// Logits per LM-head chunk when the caller leaves the chunk size to us: 32 Mi
/// f32 values (128 MiB), i.e. 128 rows at V = 262,144 and 682 at V = 49,152.
pub const DEFAULT_HEAD_CHUNK_LOGITS: usize = 1 << 25;

/// Logits per LM-head chunk on a GPU: 256 Mi (512 MiB in bf16), 1,024 rows at
/// V = 262,144, so the sampling kernel (one block per row) has several waves of
/// rows for the GPU's SMs rather than one partial wave, and the head matmul is
/// large enough to run at cuBLAS speed.
pub const DEFAULT_GPU_HEAD_CHUNK_LOGITS: usize = 1 << 28;

/// What the sampler backend needs from the model.
pub trait LmHead {
    /// V, the logits per row.
    fn vocab_size(&self) -> usize;

    /// The LM head's logits [rows, V] of `hidden_rows`, in the compute dtype,
    /// or in f32 when a final soft-cap applies; widened to f32 they are the
    /// model's logits exactly.
    fn head_logits(&self, hidden_rows: &Tensor) -> Result<Tensor, ModelError>;
}

/// Where the chunks are sampled.
enum Kind {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<super::gpu::CudaSampler>),
}

impl Kind {
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn for_device(device: &Device) -> Result<Self, ModelError> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return Ok(Kind::Cuda(Box::new(super::gpu::CudaSampler::new(dev)?)));
        }
        Ok(Kind::Cpu)
    }
}

/// Samples hidden-state rows through an [`LmHead`], `chunk_rows` rows at a
/// time, so that at most `chunk_rows × V` logits exist at once.
pub struct SamplerBackend {
    kind: Kind,
    device: Device,
    cpu: CpuSampler,
    chunk_rows: usize,
}

impl SamplerBackend {
    /// The backend for `device` (the CUDA kernel is loaded now on a CUDA
    /// device), with `chunk_rows` rows per LM-head chunk, or by default about
    /// [`DEFAULT_HEAD_CHUNK_LOGITS`] logits ([`DEFAULT_GPU_HEAD_CHUNK_LOGITS`]
    /// on a GPU) for a vocabulary of `vocab`.
    pub fn new(
        device: &Device,
        vocab: usize,
        chunk_rows: Option<usize>,
    ) -> Result<Self, ModelError> {
        let chunk_rows = chunk_rows.unwrap_or_else(|| default_chunk_rows(device, vocab)).max(1);
        let kind = Kind::for_device(device)?;
        Ok(Self { kind, device: device.clone(), cpu: CpuSampler::new(), chunk_rows })
    }

    /// Rows per LM-head chunk.
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Sends `rows` (indices into the batch's tokens) of `hidden` through
    /// `head` and the sampler, a chunk at a time, appending one sampled row per
    /// entry of `rows` (keyed by `keys`) to `out`.
    pub fn sample(
        &mut self,
        head: &dyn LmHead,
        hidden: &Tensor,
        rows: &[u32],
        keys: &[RowKey],
        params: &SamplingParams,
        out: &mut SampledRows,
    ) -> Result<(), ModelError> {
        if rows.len() != keys.len() {
            return Err(ModelError::Batch(format!("{} rows but {} keys", rows.len(), keys.len())));
        }
        let chunks = Chunks { head, hidden, rows, keys, chunk_rows: self.chunk_rows };
        match &mut self.kind {
            Kind::Cpu => chunks.sample_on_cpu(&self.device, &mut self.cpu, params, out),
            #[cfg(feature = "cuda")]
            Kind::Cuda(gpu) => chunks.sample_on_cuda(&self.device, gpu, &mut self.cpu, params, out),
        }
    }
}

/// Rows per chunk so that a chunk holds about the default number of logits.
fn default_chunk_rows(device: &Device, vocab: usize) -> usize {
    let logits =
        if device.is_cpu() { DEFAULT_HEAD_CHUNK_LOGITS } else { DEFAULT_GPU_HEAD_CHUNK_LOGITS };
    (logits / vocab.max(1)).max(1)
}

/// One call's rows, cut into LM-head chunks.
struct Chunks<'a> {
    head: &'a dyn LmHead,
    hidden: &'a Tensor,
    rows: &'a [u32],
    keys: &'a [RowKey],
    chunk_rows: usize,
}

impl Chunks<'_> {
    fn iter(&self) -> impl Iterator<Item = (&[u32], &[RowKey])> {
        self.rows.chunks(self.chunk_rows).zip(self.keys.chunks(self.chunk_rows))
    }

    /// The head's logits of one chunk of rows, contiguous.
    fn logits(&self, device: &Device, chunk: &[u32]) -> Result<Tensor, ModelError> {
        let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
        Ok(self.head.head_logits(&self.hidden.index_select(&idx, 0)?)?.contiguous()?)
    }

    /// Every chunk on the CPU, reading the f32 logits in place.
    fn sample_on_cpu(
        &self,
        device: &Device,
        sampler: &mut CpuSampler,
        params: &SamplingParams,
        out: &mut SampledRows,
    ) -> Result<(), ModelError> {
        let vocab = self.head.vocab_size();
        for (chunk, chunk_keys) in self.iter() {
            let logits = self.logits(device, chunk)?.to_dtype(DType::F32)?;
            let (storage, layout) = logits.storage_and_layout();
            match &*storage {
                candle_core::Storage::Cpu(cpu) => {
                    let start = layout.start_offset();
                    let flat = &cpu.as_slice::<f32>()?[start..start + chunk.len() * vocab];
                    sampler.sample_rows(flat, vocab, params, chunk_keys, out)?;
                }
                _ => {
                    drop(storage);
                    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
                    sampler.sample_rows(&flat, vocab, params, chunk_keys, out)?;
                }
            }
        }
        Ok(())
    }

    /// Every chunk on a CUDA device: each chunk's logits stay on the GPU and
    /// the kernel samples them where they are; a chunk the kernel cannot take
    /// (too large for its shared memory, an unsupported dtype) is sampled on
    /// the CPU, in order.
    #[cfg(feature = "cuda")]
    fn sample_on_cuda(
        &self,
        device: &Device,
        gpu: &mut super::gpu::CudaSampler,
        sampler: &mut CpuSampler,
        params: &SamplingParams,
        out: &mut SampledRows,
    ) -> Result<(), ModelError> {
        use super::gpu::GpuSampleError;
        let vocab = self.head.vocab_size();
        let fits = gpu.fits(params, vocab);
        if !fits {
            tracing::warn!(
                vocab,
                k = params.num_samples(),
                "k is too large for the CUDA sampler's shared memory: sampling on the CPU"
            );
        }
        // Pipelined: chunk i's head and kernel are queued before the host
        // waits for chunk i - 1 and decodes it, so the GPU works meanwhile.
        gpu.discard_pending().map_err(gpu_error)?;
        for (chunk, chunk_keys) in self.iter() {
            let logits = self.logits(device, chunk)?;
            if fits {
                match gpu.launch(&logits, params, chunk_keys) {
                    Ok(_) => {
                        while gpu.pending() > 1 {
                            gpu.finish(out).map_err(gpu_error)?;
                        }
                        continue;
                    }
                    Err(GpuSampleError::Sampler(e)) => return Err(e.into()),
                    Err(GpuSampleError::Device(e)) => return Err(e.into()),
                    Err(e @ (GpuSampleError::TooLarge { .. } | GpuSampleError::Unsupported(_))) => {
                        tracing::warn!(error = %e, "sampling this chunk on the CPU");
                    }
                }
            }
            // Rows stay in order: the chunks before this one first.
            while gpu.pending() > 0 {
                gpu.finish(out).map_err(gpu_error)?;
            }
            let flat = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            sampler.sample_rows(&flat, vocab, params, chunk_keys, out)?;
        }
        while gpu.pending() > 0 {
            gpu.finish(out).map_err(gpu_error)?;
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn gpu_error(e: super::gpu::GpuSampleError) -> ModelError {
    use super::gpu::GpuSampleError;
    match e {
        GpuSampleError::Sampler(e) => e.into(),
        GpuSampleError::Device(e) => e.into(),
        e => ModelError::Candle(candle_core::Error::Msg(e.to_string())),
    }
}
