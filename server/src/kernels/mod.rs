//! logitd's own CPU kernels, below both the model and the sampler: the f32
//! exponential ([`exp::exp_f32`], glibc's `expf` bit for bit) in its portable,
//! AVX2 + FMA and AVX-512F builds, and the run-time choice between them
//! ([`simd_build`], [`AVX512_OFF_ENV`]). The sampler's softmax, the CPU
//! attention's softmax and the SiLU all use these, so the three agree bit
//! for bit with each other and with `f32::exp`.
//!
//! Nothing here imports from the rest of the crate: `model` and `sampler`
//! depend on `kernels`, never on each other (`tests/arch/check_layers.py`).

pub mod exp;

pub use exp::{exp_f32, exps_below_max};

/// Whether the CPU runs the AVX-512 build of the exponentials (AVX-512F, and
/// the AVX2 + FMA the rest of that build uses), unless
/// [`AVX512_OFF_ENV`] keeps them on AVX2.
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && avx2_fma() && !avx512_turned_off()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `LOGITD_CPU_SIMD=avx2` keeps logitd's own CPU code (the exponentials of
/// the sampler, the attention softmax and the SiLU) on its AVX2 build on a CPU
/// with AVX-512, as on one without: for CPUs that slow their clock under
/// AVX-512, and to measure the AVX2 path. (gemm's matmul kernels follow the
/// build instead: `--no-default-features` leaves out their AVX-512 ones.)
pub const AVX512_OFF_ENV: &str = "LOGITD_CPU_SIMD";

/// Whether [`AVX512_OFF_ENV`] says `avx2` (read once; `native` or unset:
/// the CPU's best; another value is reported once and ignored).
fn avx512_turned_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| match std::env::var(AVX512_OFF_ENV).as_deref() {
        Ok("avx2") => true,
        Ok("native") | Err(_) => false,
        Ok(other) => {
            tracing::warn!("{AVX512_OFF_ENV}={other:?} is neither avx2 nor native: ignored");
            false
        }
    })
}

/// Which build of logitd's CPU exponentials runs here: "avx512", "avx2" or
/// "scalar" (logged when a teacher loads).
pub fn simd_build() -> &'static str {
    if avx512() {
        "avx512"
    } else if avx2_fma() {
        "avx2"
    } else {
        "scalar"
    }
}

/// Whether the CPU runs the AVX2 + FMA builds.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
