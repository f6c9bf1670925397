//! Device set-up: `--device` parsed into a candle device, and the wait for the
//! work queued on it. The only place outside `sampler/` that knows about the
//! `cuda` feature; it may not load models or sample.

use candle_core::Device;

use crate::model::ModelError;

/// Why `--device` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--device {device}: {reason}")]
pub struct DeviceError {
    /// What `--device` said.
    pub device: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// `cpu` or `cuda:N`.
pub fn parse(s: &str) -> Result<Device, DeviceError> {
    let error = |reason: String| DeviceError { device: s.to_string(), reason };
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(ordinal) = s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) else {
        return Err(DeviceError {
            device: format!("{s:?}"),
            reason: "expected `cpu` or `cuda:N`".into(),
        });
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(error("this build has no CUDA support (build with `--features cuda`)".into()));
    }
    Device::new_cuda(ordinal).map_err(|e| error(e.to_string()))
}

/// Waits until the GPU work this thread queued (loading, warm-up) has finished,
/// before another thread (the engine's) uses its results. candle 0.11 queues a
/// CUDA device's work on the calling thread's per-thread default stream, which
/// is not ordered with other threads' streams, so without this the engine
/// could read weights or buffers still being written. No-op on the CPU.
pub fn settle(device: &Device) -> Result<(), ModelError> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // The whole context: every stream, whichever thread queued the work.
        d.cuda_stream().context().synchronize().map_err(candle_core::Error::wrap)?;
        return Ok(());
    }
    device.synchronize()?;
    Ok(())
}
