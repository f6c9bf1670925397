//! The sampler backend: built once from the device, it sends hidden-state rows
//! through the model's LM head in row chunks and samples each chunk, on the
//! CPU with [`CpuSampler`] or, on a CUDA device, with the kernel where the
//! logits are. It owns the LM-head chunking, the kernel's shared-memory fit
//! check and the CPU fallback. It may not touch the model's weights or its
//! forward: it sees the model only through [`LmHead`].

use candle_core::{DType, Device, Tensor};

use super::{LmHead, ScoringError};
use crate::sampler::{CpuSampler, RowKey, RowQueries, SampledRows, SamplingParams};

/// Logits per LM-head chunk when the caller leaves the chunk size to us: 32 Mi
/// f32 values (128 MiB), i.e. 128 rows at V = 262,144 and 682 at V = 49,152.
pub const DEFAULT_HEAD_CHUNK_LOGITS: usize = 1 << 25;

/// Logits per LM-head chunk on a GPU: 256 Mi (512 MiB in bf16), 1,024 rows at
/// V = 262,144, so the sampling kernel (one block per row) has several waves of
/// rows for the GPU's SMs rather than one partial wave, and the head matmul is
/// large enough to run at cuBLAS speed.
pub const DEFAULT_GPU_HEAD_CHUNK_LOGITS: usize = 1 << 28;

/// Where the chunks are sampled.
enum Kind {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::sampler::gpu::CudaSampler>),
}

impl Kind {
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn for_device(device: &Device) -> Result<Self, ScoringError> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return Ok(Kind::Cuda(Box::new(crate::sampler::gpu::CudaSampler::new(dev)?)));
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
    ) -> Result<Self, ScoringError> {
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
    /// entry of `rows` (keyed by `keys`, scored as `queries` ask) to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &mut self,
        head: &dyn LmHead,
        hidden: &Tensor,
        rows: &[u32],
        keys: &[RowKey],
        queries: RowQueries<'_>,
        params: &SamplingParams,
        out: &mut SampledRows,
    ) -> Result<(), ScoringError> {
        if rows.len() != keys.len() {
            return Err(ScoringError::Batch(format!(
                "{} rows but {} keys",
                rows.len(),
                keys.len()
            )));
        }
        queries.check(rows.len(), head.vocab_size())?;
        let chunks = Chunks { head, hidden, rows, keys, queries, chunk_rows: self.chunk_rows };
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
    queries: RowQueries<'a>,
    chunk_rows: usize,
}

impl<'a> Chunks<'a> {
    /// The chunks: their rows, keys and queries.
    fn iter(&self) -> impl Iterator<Item = (&'a [u32], &'a [RowKey], RowQueries<'a>)> + use<'a> {
        let (n, queries) = (self.chunk_rows, self.queries);
        self.rows
            .chunks(n)
            .zip(self.keys.chunks(n))
            .enumerate()
            .map(move |(i, (rows, keys))| (rows, keys, queries.rows(i * n..i * n + rows.len())))
    }

    /// The head's logits of one chunk of rows, contiguous.
    fn logits(&self, device: &Device, chunk: &[u32]) -> Result<Tensor, ScoringError> {
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
    ) -> Result<(), ScoringError> {
        let vocab = self.head.vocab_size();
        for (chunk, chunk_keys, queries) in self.iter() {
            let logits = self.logits(device, chunk)?.to_dtype(DType::F32)?;
            let (storage, layout) = logits.storage_and_layout();
            match &*storage {
                candle_core::Storage::Cpu(cpu) => {
                    let start = layout.start_offset();
                    let flat = &cpu.as_slice::<f32>()?[start..start + chunk.len() * vocab];
                    sampler.sample_rows_scored(flat, vocab, params, chunk_keys, queries, out)?;
                }
                _ => {
                    drop(storage);
                    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
                    sampler.sample_rows_scored(&flat, vocab, params, chunk_keys, queries, out)?;
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
        gpu: &mut crate::sampler::gpu::CudaSampler,
        sampler: &mut CpuSampler,
        params: &SamplingParams,
        out: &mut SampledRows,
    ) -> Result<(), ScoringError> {
        use crate::sampler::{Method, gpu::GpuSampleError};
        let vocab = self.head.vocab_size();
        let first_row = out.num_rows();
        // The kernel has no id-less mode: its top-k path with k = 1 gives each
        // row's lse, and the entries are dropped below.
        let kernel_params = match params.method() {
            Method::None => SamplingParams::new(Method::TopK, 1, params.temperature())?,
            _ => *params,
        };
        let fits = gpu.fits(&kernel_params, vocab);
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
        let mut gathered = Vec::new();
        for (chunk, chunk_keys, queries) in self.iter() {
            let logits = self.logits(device, chunk)?;
            // Queued on the device's stream with the kernel; read at the end.
            gathered.push(Gathered::queue(&logits, vocab, queries)?);
            if fits {
                match gpu.launch(&logits, &kernel_params, chunk_keys) {
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
            sampler.sample_rows(&flat, vocab, &kernel_params, chunk_keys, out)?;
        }
        while gpu.pending() > 0 {
            gpu.finish(out).map_err(gpu_error)?;
        }
        match params.method() {
            Method::None => out.drop_entries(first_row..),
            Method::TopK => out.order_by_logprob(first_row..),
            Method::Sample => {}
        }
        if !self.queries.is_empty() {
            Gathered::fill(gathered, self.queries, params.temperature(), first_row, out)?;
        }
        Ok(())
    }
}

/// On a GPU, the logits a chunk's queries need, gathered on the device: the
/// realised tokens' logits and ranks, and the candidates' logits. Their log p
/// are z / T − lse with the lse the kernel computed for the row.
#[cfg(feature = "cuda")]
struct Gathered {
    rows: usize,
    realised: Option<(Tensor, Tensor)>,
    candidates: Option<Tensor>,
}

#[cfg(feature = "cuda")]
impl Gathered {
    fn queue(logits: &Tensor, vocab: usize, q: RowQueries<'_>) -> Result<Self, ScoringError> {
        let device = logits.device();
        let rows = logits.dim(0)?;
        let flat = logits.flatten_all()?;
        let realised = if q.realised.is_empty() {
            None
        } else {
            let idx: Vec<u32> = (0..rows)
                .map(|r| {
                    let id = q.realised[r];
                    (r * vocab) as u32 + if id == crate::sampler::NO_TOKEN { 0 } else { id }
                })
                .collect();
            let z = flat.index_select(&Tensor::from_vec(idx, rows, device)?, 0)?;
            let larger =
                logits.broadcast_gt(&z.reshape((rows, 1))?)?.to_dtype(DType::F32)?.sum(1)?;
            Some((z, larger))
        };
        let candidates = if q.candidate_offsets.is_empty() {
            None
        } else {
            let idx: Vec<u32> = (0..rows)
                .flat_map(|r| q.row(r).1.iter().map(move |&id| (r * vocab) as u32 + id))
                .collect();
            let n = idx.len();
            Some(flat.index_select(&Tensor::from_vec(idx, n, device)?, 0)?)
        };
        Ok(Self { rows, realised, candidates })
    }

    /// Replaces the scores of rows `first_row..` of `out` with the gathered ones.
    fn fill(
        chunks: Vec<Gathered>,
        queries: RowQueries<'_>,
        temperature: f32,
        first_row: usize,
        out: &mut SampledRows,
    ) -> Result<(), ScoringError> {
        let inv_t = 1.0 / f64::from(temperature);
        let lse = out.lse[first_row..].to_vec();
        let logprob = |z: f32, r: usize| (f64::from(z) * inv_t - f64::from(lse[r])) as f32;
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
        out.token_logprobs.truncate(first_row.min(out.token_logprobs.len()));
        out.token_ranks.truncate(first_row.min(out.token_ranks.len()));
        out.candidate_offsets.truncate(first_row + 1);
        let base = out.candidate_offsets[first_row] as usize;
        out.candidate_logprobs.truncate(base);
        let mut r = 0;
        for chunk in chunks {
            if let Some((z, larger)) = &chunk.realised {
                let (z, larger) = (host(z)?, host(larger)?);
                for (i, (z, larger)) in z.into_iter().zip(larger).enumerate() {
                    if queries.realised[r + i] == crate::sampler::NO_TOKEN {
                        out.token_logprobs.push(f32::NAN);
                        out.token_ranks.push(0);
                    } else {
                        out.token_logprobs.push(logprob(z, r + i));
                        out.token_ranks.push(1 + larger as u32);
                    }
                }
            }
            let cand = chunk.candidates.as_ref().map(host).transpose()?.unwrap_or_default();
            let mut c = cand.iter();
            for row in r..r + chunk.rows {
                for _ in queries.row(row).1 {
                    let z = *c.next().expect("one gathered logit per candidate: this is a bug");
                    out.candidate_logprobs.push(logprob(z, row));
                }
                let end = u32::try_from(out.candidate_logprobs.len())
                    .expect("more than 2^32 candidates in one batch: this is a bug");
                out.candidate_offsets.push(end);
            }
            r += chunk.rows;
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn gpu_error(e: crate::sampler::gpu::GpuSampleError) -> ScoringError {
    use crate::sampler::gpu::GpuSampleError;
    match e {
        GpuSampleError::Sampler(e) => e.into(),
        GpuSampleError::Device(e) => e.into(),
        e => ScoringError::Device(candle_core::Error::Msg(e.to_string())),
    }
}
