#![cfg(target_arch = "x86_64")]
//! `LOGITD_CPU_SIMD=avx2` keeps logitd's CPU exponentials on their AVX2 build
//! even on a CPU with AVX-512 (its own test binary: the setting is read once
//! per process).

use logitd::kernels::{AVX512_OFF_ENV, simd_build};

#[test]
fn avx2_setting_keeps_the_exponentials_off_avx512() {
    // SAFETY: set before anything reads the environment, and this binary runs
    // no other test.
    unsafe { std::env::set_var(AVX512_OFF_ENV, "avx2") };
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    let want = if avx2 { "avx2" } else { "scalar" };
    assert_eq!(simd_build(), want);
    // And the exponentials still agree with the scalar reference there.
    let z: Vec<f32> = (0..1000).map(|i| -(i as f32) * 0.1).collect();
    let mut e = vec![0f32; z.len()];
    logitd::kernels::exps_below_max(&z, 0.0, &mut e);
    for (x, e) in z.iter().zip(&e) {
        assert_eq!(e.to_bits(), logitd::kernels::exp_f32(*x).to_bits(), "exp({x})");
    }
}
