//! The CUDA sampling kernel's launcher (`cuda` feature): samples a chunk of
//! logits where the LM head left them on the GPU, in f32, f16 or bf16.
//!
//! The kernel (`cuda/sampler.cu`, compiled to PTX by `build.rs` with nvcc and
//! loaded through candle's CUDA device, on its stream) follows the reference
//! sampler of [`super::cpu`]: the same Philox stream, the same exponentials
//! bit for bit by design (`cuda/logitd_math.cuh`, checked on the host; on a GPU
//! this is still to be measured), sums in f64 in another order. Its
//! results land in pinned host memory mapped into the device, so the kernel's
//! own writes are the one device-to-host transfer of a chunk; [`decode_rows`]
//! turns them into [`SampledRows`].
//!
//! Where the kernel and the reference can differ: only in the order of f64
//! additions (tile sums, the cumulative sum of tiles and of the k + 1
//! exponentials, the cumulative sum inside a tile) and in `ln` (CUDA's and the
//! C library's double logarithms both err by at most 1 ulp). These move a CDF
//! boundary or a threshold by a few units in the 16th digit, so a draw changes
//! id only when its threshold lies that close to a boundary.

use std::ffi::c_void;

use candle_core::{
    Storage, Tensor,
    cuda_backend::{
        CudaDevice, CudaStorageSlice, WrapErr,
        cudarc::driver::{
            CudaEvent, CudaFunction, CudaSlice, LaunchConfig, PinnedHostSlice, PushKernelArg,
            sys::{self, CUdevice_attribute, CUfunction_attribute},
        },
    },
};

use super::{
    RowKey, SampledRows, SamplerError, SamplingParams,
    gpu_layout::{self, META_WORDS, THREADS, decode_rows},
};

/// The kernel, compiled by build.rs.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/logitd_sampler.ptx"));
const MODULE: &str = "logitd_sampler";

/// Why a chunk was not sampled on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuSampleError {
    /// A row could not be sampled (the same errors as the CPU sampler).
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// The launch needs more shared memory than a block may have on this GPU
    /// (very large k or V); the caller samples on the CPU instead.
    #[error("the CUDA sampler needs {needed} bytes of shared memory, the GPU has {available}")]
    TooLarge {
        /// Bytes the launch needs.
        needed: usize,
        /// Bytes a block may have.
        available: usize,
    },
    /// The logits are not a CUDA tensor of f32, f16 or bf16.
    #[error("the CUDA sampler takes f32, f16 or bf16 CUDA logits, got {0}")]
    Unsupported(String),
    /// A CUDA call failed.
    #[error(transparent)]
    Device(#[from] candle_core::Error),
}

/// Pinned host memory, mapped into the device: meta, ids, counts, log p
/// (written by the kernel), and the rows' Philox keys (written by the host
/// before the launch and read by the kernel in place: no copy from pageable
/// memory, no device allocation per call).
struct Mapped {
    host: PinnedHostSlice<u32>,
    device_ptr: u64,
    rows: usize,
    entries: usize,
}

impl Mapped {
    fn new(device: &CudaDevice, rows: usize, entries: usize) -> candle_core::Result<Self> {
        let len = rows * META_WORDS + 3 * entries + KEY_WORDS * rows;
        let ctx = device.cuda_stream().context().clone();
        // SAFETY: the kernel writes every word the host reads (each row's meta,
        // and the entries that meta points at) before the host reads them.
        let mut host =
            unsafe { ctx.alloc_pinned_with_flags::<u32>(len, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
                .w()?;
        let ptr = host.as_mut_ptr().w()?;
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a live allocation of cuMemHostAlloc with DEVICEMAP.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr as *mut c_void, 0) }
            .result()
            .w()?;
        Ok(Self { host, device_ptr, rows, entries })
    }

    /// Device addresses of meta, ids, counts, log p and keys.
    fn pointers(&self) -> [u64; 5] {
        let meta = self.device_ptr;
        let ids = meta + (self.rows * META_WORDS * 4) as u64;
        let counts = ids + (self.entries * 4) as u64;
        let lps = counts + (self.entries * 4) as u64;
        let keys = lps + (self.entries * 4) as u64;
        [meta, ids, counts, lps, keys]
    }

    /// The host's view of the keys (after the other buffers).
    fn keys_mut(&mut self) -> candle_core::Result<&mut [u32]> {
        let skip = self.rows * META_WORDS + 3 * self.entries;
        Ok(&mut self.host.as_mut_slice().w()?[skip..])
    }
}

/// Key words per row: the Philox key (2 words), the sequence, the position.
const KEY_WORDS: usize = 4;

/// What one of the kernel's entry points uses on this GPU (for benchmarks and
/// the GPU run's preflight).
#[derive(Debug, Clone)]
pub struct KernelResources {
    /// The entry point.
    pub name: &'static str,
    /// Registers per thread.
    pub registers: i32,
    /// Local memory per thread (register spills and stack), bytes.
    pub local_bytes: i32,
    /// Static shared memory per block, bytes.
    pub static_shared_bytes: i32,
    /// Blocks of the kernel's block size resident per SM with the dynamic
    /// shared memory of the launch asked about.
    pub blocks_per_sm: u32,
}

/// The CUDA sampler of one device: the loaded kernel and two reusable output
/// buffers, so that one chunk's kernel (and the next chunk's LM head, queued
/// behind it) can run while the host decodes the chunk before. Each buffer has
/// its own cursor (the device word its rows reserve entries with), so two
/// launches in flight never share one, whatever stream they run on.
pub struct CudaSampler {
    device: CudaDevice,
    f32: CudaFunction,
    bf16: CudaFunction,
    f16: CudaFunction,
    max_dynamic_shared: usize,
    /// The entry cursor of each output buffer (zeroed before its launch).
    cursors: [CudaSlice<u32>; 2],
    mapped: [Option<Mapped>; 2],
    /// Launched chunks not yet decoded, oldest first (at most two).
    pending: std::collections::VecDeque<Pending>,
    /// The buffer the next launch writes into.
    next: usize,
    timing: bool,
    last_kernel_seconds: Option<f64>,
}

/// A launched chunk: which buffer it writes, its rows, and events that mark
/// the kernel's end (and, when timing, its start).
struct Pending {
    slot: usize,
    rows: usize,
    done: CudaEvent,
    timing: Option<(CudaEvent, CudaEvent)>,
}

impl std::fmt::Debug for CudaSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSampler").field("device", &self.device).finish_non_exhaustive()
    }
}

impl CudaSampler {
    /// Loads the kernel on `device`.
    pub fn new(device: &CudaDevice) -> candle_core::Result<Self> {
        let load = |name: &str| -> candle_core::Result<CudaFunction> {
            Ok(device.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
        };
        let (f32, bf16, f16) =
            (load("logitd_sample_f32")?, load("logitd_sample_bf16")?, load("logitd_sample_f16")?);
        let ctx = device.cuda_stream().context().clone();
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .w()? as usize;
        let mut max_dynamic_shared = usize::MAX;
        for func in [&f32, &bf16, &f16] {
            let dynamic = optin.saturating_sub(func.shared_size_bytes().w()? as usize);
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic as i32,
            )
            .w()?;
            max_dynamic_shared = max_dynamic_shared.min(dynamic);
        }
        let cursors = [device.alloc_zeros::<u32>(1)?, device.alloc_zeros::<u32>(1)?];
        Ok(Self {
            device: device.clone(),
            f32,
            bf16,
            f16,
            max_dynamic_shared,
            cursors,
            mapped: [None, None],
            pending: std::collections::VecDeque::new(),
            next: 0,
            timing: false,
            last_kernel_seconds: None,
        })
    }

    /// Registers, spills, static shared memory and resident blocks per SM of
    /// each of the kernel's entry points, for a launch of `params` at `vocab`.
    pub fn resources(
        &self,
        params: &SamplingParams,
        vocab: usize,
    ) -> candle_core::Result<Vec<KernelResources>> {
        let dynamic =
            gpu_layout::shared_bytes(params.method(), vocab, params.num_samples() as usize);
        [
            ("logitd_sample_f32", &self.f32),
            ("logitd_sample_bf16", &self.bf16),
            ("logitd_sample_f16", &self.f16),
        ]
        .into_iter()
        .map(|(name, f)| {
            Ok(KernelResources {
                name,
                registers: f.num_regs().w()?,
                local_bytes: f.local_size_bytes().w()?,
                static_shared_bytes: f.shared_size_bytes().w()?,
                blocks_per_sm: f
                    .occupancy_max_active_blocks_per_multiprocessor(THREADS, dynamic, None)
                    .w()?,
            })
        })
        .collect()
    }

    /// Times each launch with CUDA events (for benchmarks); see
    /// [`Self::last_kernel_seconds`].
    pub fn set_timing(&mut self, on: bool) {
        self.timing = on;
    }

    /// The kernel's own time in the last [`Self::sample`] call, when timing is on.
    pub fn last_kernel_seconds(&self) -> Option<f64> {
        self.last_kernel_seconds
    }

    /// Whether a chunk with this vocabulary and k fits the kernel on this GPU.
    pub fn fits(&self, params: &SamplingParams, vocab: usize) -> bool {
        gpu_layout::shared_bytes(params.method(), vocab, params.num_samples() as usize)
            <= self.max_dynamic_shared
    }

    /// Samples the rows of `logits` ([rows, vocab], contiguous, on this device),
    /// keyed by `keys`, appending them to `out`. On a row error `out` keeps the
    /// rows before the failing one, as on the CPU. ([`Self::launch`] then
    /// [`Self::finish`].)
    pub fn sample(
        &mut self,
        logits: &Tensor,
        params: &SamplingParams,
        keys: &[RowKey],
        out: &mut SampledRows,
    ) -> Result<(), GpuSampleError> {
        self.discard_pending()?;
        if self.launch(logits, params, keys)? {
            self.finish(out)?;
        }
        Ok(())
    }

    /// Chunks launched and not yet finished.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Waits for chunks launched and not finished (after an error stopped a
    /// caller between [`Self::launch`] and [`Self::finish`]) and drops their rows.
    pub fn discard_pending(&mut self) -> Result<(), GpuSampleError> {
        while let Some(p) = self.pending.pop_front() {
            p.done.synchronize().w()?;
        }
        Ok(())
    }

    /// Queues the sampling of the rows of `logits` ([rows, vocab], contiguous,
    /// on this device) on the device's stream, keyed by `keys`, and returns at
    /// once; [`Self::finish`] waits for it and decodes its rows. At most two
    /// chunks may be pending: the third launch must wait for a finish. Returns
    /// false (nothing launched, nothing to finish) for zero rows.
    pub fn launch(
        &mut self,
        logits: &Tensor,
        params: &SamplingParams,
        keys: &[RowKey],
    ) -> Result<bool, GpuSampleError> {
        let (rows, vocab) = logits.dims2()?;
        if vocab == 0 {
            return Err(SamplerError::EmptyRow.into());
        }
        if rows != keys.len() {
            return Err(
                SamplerError::ShapeMismatch { len: rows * vocab, rows: keys.len(), vocab }.into()
            );
        }
        if rows == 0 {
            return Ok(false);
        }
        let k = params.num_samples() as usize;
        let shared = gpu_layout::shared_bytes(params.method(), vocab, k);
        if shared > self.max_dynamic_shared {
            return Err(GpuSampleError::TooLarge {
                needed: shared,
                available: self.max_dynamic_shared,
            });
        }
        if !logits.is_contiguous() {
            return Err(GpuSampleError::Unsupported("non-contiguous logits".into()));
        }
        assert!(
            self.pending.len() < 2,
            "a third chunk launched before the first was finished: this is a bug"
        );
        let slot = self.next;
        debug_assert!(self.pending.iter().all(|p| p.slot != slot));
        let entries = gpu_layout::max_entries(rows, k);
        let buffer = &mut self.mapped[slot];
        if buffer.as_ref().is_none_or(|m| m.rows < rows || m.entries < entries) {
            *buffer = None; // free the old buffer first
            *buffer = Some(Mapped::new(&self.device, rows, entries)?);
        }
        let mapped = buffer.as_mut().expect("allocated just now");
        let [meta, ids, counts, lps, key_ptr] = mapped.pointers();
        // This buffer's last kernel has finished (it was waited for before its
        // rows were decoded), so no kernel reads these words now.
        for (w, k) in mapped.keys_mut()?.chunks_exact_mut(KEY_WORDS).zip(keys) {
            let [lo, hi] = k.philox_key();
            w.copy_from_slice(&[lo, hi, k.sequence, k.position]);
        }
        let stream = self.device.cuda_stream();
        // This slot's cursor: the other slot's launch may still be in flight.
        let cursor = &mut self.cursors[slot];
        stream.memset_zeros(cursor).w()?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let vocab_u32 = u32::try_from(vocab)
            .map_err(|_| GpuSampleError::Unsupported(format!("vocabulary of {vocab}")))?;
        let method = gpu_layout::method_code(params.method());
        let k_u32 = params.num_samples();
        let inv_t = 1.0 / f64::from(params.temperature());
        let t_is_one = i32::from(params.temperature() == 1.0);
        let (storage, layout) = logits.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(GpuSampleError::Unsupported(format!("logits on {:?}", logits.device())));
        };
        let start = layout.start_offset();
        macro_rules! launch {
            ($func:expr, $slice:expr) => {{
                let view = $slice.slice(start..start + rows * vocab);
                let mut b = stream.launch_builder(&$func);
                b.arg(&view)
                    .arg(&vocab_u32)
                    .arg(&key_ptr)
                    .arg(&method)
                    .arg(&k_u32)
                    .arg(&inv_t)
                    .arg(&t_is_one)
                    .arg(&mut *cursor)
                    .arg(&ids)
                    .arg(&counts)
                    .arg(&lps)
                    .arg(&meta);
                if self.timing {
                    b.record_kernel_launch(sys::CUevent_flags::CU_EVENT_DEFAULT);
                }
                // SAFETY: the arguments match the kernel's signature in
                // sampler.cu; the kernel reads rows × vocab logits from `view`
                // (kept alive by the stream's order: a freed tensor's memory is
                // reused only by work queued after this kernel), 4 key words per
                // row (mapped, `rows` were allocated), and writes at most k
                // entries per row (`entries` = rows × k were allocated) and
                // META_WORDS meta words per row (`rows` were allocated).
                unsafe { b.launch(cfg) }.w()?
            }};
        }
        let timing = match &cuda.slice {
            CudaStorageSlice::F32(s) => launch!(self.f32, s),
            CudaStorageSlice::BF16(s) => launch!(self.bf16, s),
            CudaStorageSlice::F16(s) => launch!(self.f16, s),
            _ => return Err(GpuSampleError::Unsupported(format!("{:?} logits", logits.dtype()))),
        };
        drop(storage);
        let done = stream.record_event(None).w()?;
        self.pending.push_back(Pending { slot, rows, done, timing });
        self.next = 1 - slot;
        Ok(true)
    }

    /// Waits for the oldest launched chunk and appends its rows to `out`. On a
    /// row error `out` keeps the rows before the failing one, as on the CPU.
    pub fn finish(&mut self, out: &mut SampledRows) -> Result<(), GpuSampleError> {
        let Some(p) = self.pending.pop_front() else {
            panic!("finish() without a pending launch: this is a bug");
        };
        // The mapped memory is read only after the kernel has finished.
        p.done.synchronize().w()?;
        self.last_kernel_seconds = match &p.timing {
            Some((start, end)) => Some(f64::from(start.elapsed_ms(end).w()?) / 1e3),
            None => None,
        };
        let mapped = self.mapped[p.slot].as_ref().expect("a pending launch has its buffer");
        let words = mapped.host.as_slice().w()?;
        let (meta_w, rest) = words.split_at(mapped.rows * META_WORDS);
        let (ids_w, rest) = rest.split_at(mapped.entries);
        let (counts_w, rest) = rest.split_at(mapped.entries);
        let (lps_w, _keys) = rest.split_at(mapped.entries);
        // log p travels as f32 bits in a u32 buffer.
        let lps_f: &[f32] = bytemuck_f32(lps_w);
        decode_rows(meta_w, ids_w, counts_w, lps_f, p.rows, out)?;
        Ok(())
    }
}

/// The f32 values whose bits `w` holds.
fn bytemuck_f32(w: &[u32]) -> &[f32] {
    // SAFETY: u32 and f32 have the same size and alignment, and every bit
    // pattern is a valid f32.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<f32>(), w.len()) }
}
