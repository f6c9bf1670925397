//! The scalar arithmetic of the CUDA sampling kernel, checked on the CPU.
//!
//! `server/src/sampler/cuda/logitd_math.cuh` holds every floating-point step
//! the kernel shares with the reference sampler: the exponential e_i, log p_i
//! and the lse, the Philox stream and its uniforms, and the top-k keys. The
//! kernel includes that file; this test compiles the same file for the host
//! with the system C compiler (contraction off, as nvcc compiles the kernel
//! with `--fmad=false`) and compares it, bit for bit, with the Rust reference
//! (`kernels::exp_f32`, `philox4x32_10`, the contract's formulas). It does not run the
//! kernel; `server/tests/gpu_sampler.rs` does that on a GPU.
//!
//! The exponential is the part that decides whether CPU and GPU draw the same
//! ids: the reference's `exp_f32` and the kernel's `logitd_expf` are both
//! glibc's expf algorithm in double precision with the FMA build's fused
//! multiply-adds (also `f32::exp` on x86-64 Linux with FMA). Set
//! `LOGITD_FULL_EXPF_SWEEP=1` to compare every float in [-104, 0] (1.1e9
//! values, a few minutes) instead of one in 257.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::{Command, Stdio},
};

use logitd::{kernels::exp_f32, sampler::philox::philox4x32_10};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// The harness, compiled once per test run.
fn harness() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(compile_harness).clone()
}

fn compile_harness() -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_math/harness.c");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("logitd_cuda_math_harness");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-O2", "-ffp-contract=off", "-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-lm")
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e}"));
    assert!(status.success(), "compiling {}", src.display());
    out
}

/// Runs the harness in `mode` on `input`, returning `out_len` bytes per record.
fn run(bin: &PathBuf, mode: &str, input: Vec<u8>, records: usize, out_len: usize) -> Vec<u8> {
    let mut child = Command::new(bin)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the harness");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input).expect("feeding the harness"));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success(), "harness {mode} failed");
    assert_eq!(out.len(), records * out_len, "harness {mode}: output length");
    out
}

/// A harness record of an f32's bits followed by an f64's bits.
fn f32_and_f64(rec: &[u8]) -> (u32, u64) {
    (
        u32::from_le_bytes(rec[..4].try_into().unwrap()),
        u64::from_le_bytes(rec[4..].try_into().unwrap()),
    )
}

fn words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// glibc's generic (non-FMA) expf differs from its FMA build, which the
/// reference and the kernel follow, at this one input of [-104, 0].
const GENERIC_GLIBC_DIFFERS: f32 = f32::from_bits(0xc27c_65d9); // -0x1.f8cbb2p+5

#[test]
fn device_expf_is_the_reference_exp_f32_bit_for_bit() {
    let bin = harness();
    let full = std::env::var_os("LOGITD_FULL_EXPF_SWEEP").is_some();
    let stride: u32 = if full { 1 } else { 257 };
    let limit = (-104.0f32).to_bits();
    let mut special: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::NEG_INFINITY,
        GENERIC_GLIBC_DIFFERS,
        -f32::MIN_POSITIVE,
        -f32::from_bits(1),
        -1e-30,
        -0.5,
        -1.0,
        -87.33655, // below this exp is subnormal
        -103.27893,
        -1000.0,
        f32::MIN,
    ];
    // Around the underflow cut-off log(2^-150) = -0x1.9fe368p6.
    let cut = f32::from_bits(0xc2cf_f1b4);
    for d in 0..8u32 {
        special.push(f32::from_bits(cut.to_bits() - d));
        special.push(f32::from_bits(cut.to_bits() + d));
    }
    let mut checked = 0u64;
    let mut mismatches = Vec::new();
    let mut start = 0x8000_0000u32;
    let mut first = true;
    // Streams of at most 2^24 inputs per harness run.
    while start <= limit {
        let mut xs: Vec<f32> = Vec::new();
        if first {
            xs.extend(&special);
            first = false;
        }
        let mut b = start;
        while b <= limit && xs.len() < 1 << 24 {
            xs.push(f32::from_bits(b));
            b = b.saturating_add(stride);
            if b == u32::MAX {
                break;
            }
        }
        start = b;
        let input: Vec<u8> = xs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        let got = run(&bin, "expf", input, xs.len(), 12);
        for (x, rec) in xs.iter().zip(got.chunks_exact(12)) {
            let (g, gd) = f32_and_f64(rec);
            let want = exp_f32(*x);
            checked += 1;
            // The kernel sums the f64 form, which must be the f32 result exactly.
            if g != want.to_bits() || gd != f64::from(want).to_bits() {
                mismatches.push((*x, f32::from_bits(g), f64::from_bits(gd), want));
            }
        }
        if b == u32::MAX {
            break;
        }
    }
    println!("compared {checked} inputs in [-104, 0] and specials; {} differ", mismatches.len());
    assert!(mismatches.is_empty(), "device expf differs from the reference's: {mismatches:?}");
}

/// The reference's e_i (server/src/sampler/cpu.rs, step 1).
fn reference_weight(z: f32, m: f32, inv_t: f64) -> f32 {
    exp_f32(((f64::from(z) - f64::from(m)) * inv_t) as f32)
}

fn random_pair(rng: &mut StdRng) -> (f32, f32) {
    let m: f32 = match rng.random_range(0..5) {
        0 => rng.random_range(-30.0..30.0),
        1 => rng.random_range(-3.0e4..3.0e4),
        2 => rng.random_range(-1e-3..1e-3),
        3 => {
            f32::from_bits(rng.random::<u32>() & 0x7fff_ffff).min(1e30)
                * rng.random_range(-1.0..1.0)
        }
        _ => (rng.random_range(-60i32..60) as f32) * 0.25,
    };
    let gap: f32 = match rng.random_range(0..6) {
        0 => 0.0,
        1 => rng.random_range(0.0..120.0),
        2 => rng.random_range(0.0..1e-3),
        3 => f32::from_bits(rng.random::<u32>() & 0x7f7f_ffff),
        4 => (rng.random_range(0..400) as f32) * 0.25,
        _ => f32::INFINITY,
    };
    let z = if gap.is_infinite() { f32::NEG_INFINITY } else { m - gap };
    (z.min(m), m)
}

#[test]
fn device_weight_is_the_reference_weight_at_every_temperature() {
    let bin = harness();
    let mut rng = StdRng::seed_from_u64(11);
    let temps = [1.0f32, 0.5, 0.7, 1.3, 2.0, 0.05, 20.0, 0.999_999_9, 1.000_000_1];
    let mut cases = Vec::new();
    for i in 0..400_000 {
        let (z, m) = random_pair(&mut rng);
        let t = if i % 10 == 9 { rng.random_range(0.01f32..50.0) } else { temps[i % temps.len()] };
        cases.push((z, m, t));
    }
    let mut input = Vec::new();
    for &(z, m, t) in &cases {
        let inv_t = 1.0 / f64::from(t);
        input.extend(z.to_bits().to_le_bytes());
        input.extend(m.to_bits().to_le_bytes());
        input.extend(inv_t.to_bits().to_le_bytes());
        input.extend(u32::from(t == 1.0).to_le_bytes());
        input.extend(0u32.to_le_bytes());
    }
    let got = run(&bin, "weight", input, cases.len(), 12);
    let mut bad = Vec::new();
    for (&(z, m, t), rec) in cases.iter().zip(got.chunks_exact(12)) {
        let (g, gd) = f32_and_f64(rec);
        let want = reference_weight(z, m, 1.0 / f64::from(t));
        if want.to_bits() != g || f64::from(want).to_bits() != gd {
            bad.push((z, m, t, f32::from_bits(g), f64::from_bits(gd), want));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ, e.g. {:?}",
        bad.len(),
        cases.len(),
        &bad[..bad.len().min(5)]
    );
}

/// The kernel's rounding of a double to f32 in the integers is the conversion
/// `(d as f32) as f64`: ties both ways, the ends of f32's normal range, huge
/// and tiny values, both signs.
#[test]
fn device_round_to_f32_is_the_conversion() {
    let bin = harness();
    let mut rng = StdRng::seed_from_u64(5);
    let mut xs: Vec<f64> = vec![
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MAX,
        f64::MIN_POSITIVE,
        f64::from(f32::MAX),
        f64::from(f32::MIN_POSITIVE),
        -f64::from(f32::MIN_POSITIVE),
        2f64.powi(127),
        -2f64.powi(127),
        2f64.powi(-127),
        2f64.powi(-150),
        1.0,
        -104.0,
    ];
    for _ in 0..1_000_000 {
        let exp = rng.random_range(1023 - 160..1023 + 140u64);
        let mant: u64 = rng.random::<u64>() & ((1 << 52) - 1);
        // Three draws in four sit at or next to a tie of the f32 rounding.
        let mant = match rng.random_range(0..4) {
            0 => (mant & !0x1FFF_FFFF) | 0x1000_0000,
            1 => (mant & !0x1FFF_FFFF) | 0x0FFF_FFFF,
            2 => (mant & !0x1FFF_FFFF) | 0x1000_0001,
            _ => mant,
        };
        let sign = u64::from(rng.random::<bool>()) << 63;
        xs.push(f64::from_bits(sign | (exp << 52) | mant));
    }
    let input: Vec<u8> = xs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    let got = run(&bin, "round", input, xs.len(), 8);
    let bad: Vec<(f64, f64, f64)> = xs
        .iter()
        .zip(got.chunks_exact(8))
        .map(|(x, g)| {
            (*x, f64::from_bits(u64::from_le_bytes(g.try_into().unwrap())), f64::from(*x as f32))
        })
        .filter(|(_, g, w)| g.to_bits() != w.to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} differ, e.g. {:?}",
        bad.len(),
        xs.len(),
        &bad[..bad.len().min(5)]
    );
}

#[test]
fn device_logprob_and_lse_follow_the_contract() {
    let bin = harness();
    let mut rng = StdRng::seed_from_u64(12);
    let mut cases = Vec::new();
    for _ in 0..200_000 {
        let (z, m) = random_pair(&mut rng);
        let inv_t = 1.0 / f64::from(rng.random_range(0.05f32..10.0));
        let ln_sum = rng.random_range(0.0f64..13.0);
        cases.push((z, m, inv_t, ln_sum));
    }
    let mut input = Vec::new();
    for &(z, m, inv_t, ln_sum) in &cases {
        input.extend(z.to_bits().to_le_bytes());
        input.extend(m.to_bits().to_le_bytes());
        input.extend(inv_t.to_bits().to_le_bytes());
        input.extend(ln_sum.to_bits().to_le_bytes());
    }
    let got = words(&run(&bin, "logprob", input, cases.len(), 8));
    for (i, &(z, m, inv_t, ln_sum)) in cases.iter().enumerate() {
        // README, "The sampling contract": log p_i = (z_i − m)/T − ln S and
        // lse = m/T + ln S, in f64, rounded once to f32.
        let logprob = ((f64::from(z) - f64::from(m)) * inv_t - ln_sum) as f32;
        let lse = (f64::from(m) * inv_t + ln_sum) as f32;
        assert_eq!(got[2 * i], logprob.to_bits(), "log p of z={z} m={m} 1/T={inv_t} lnS={ln_sum}");
        assert_eq!(got[2 * i + 1], lse.to_bits(), "lse of m={m} 1/T={inv_t} lnS={ln_sum}");
    }
}

#[test]
fn device_philox_and_uniforms_are_the_reference_stream() {
    let bin = harness();
    let mut rng = StdRng::seed_from_u64(13);
    let mut cases: Vec<[u32; 6]> = vec![[0; 6], [u32::MAX; 6]];
    for _ in 0..100_000 {
        cases.push(std::array::from_fn(|_| rng.random()));
    }
    let input: Vec<u8> = cases.iter().flatten().flat_map(|w| w.to_le_bytes()).collect();
    let got = words(&run(&bin, "philox", input, cases.len(), 16));
    for (i, c) in cases.iter().enumerate() {
        let want = philox4x32_10([c[0], c[1], c[2], c[3]], [c[4], c[5]]);
        assert_eq!(&got[4 * i..4 * i + 4], &want, "counter {:?} key {:?}", &c[..4], &c[4..]);
    }
    let xs: Vec<u32> = [0, 1, u32::MAX, u32::MAX - 1, 1 << 31]
        .into_iter()
        .chain((0..100_000).map(|_| rng.random()))
        .collect();
    let input: Vec<u8> = xs.iter().flat_map(|w| w.to_le_bytes()).collect();
    let got = run(&bin, "uniform", input, xs.len(), 8);
    for (x, g) in xs.iter().zip(got.chunks_exact(8)) {
        // The reference's uniform: (x + 1/2) / 2^32, exactly.
        let want = (f64::from(*x) + 0.5) * (1.0 / 4_294_967_296.0);
        assert_eq!(u64::from_le_bytes(g.try_into().unwrap()), want.to_bits(), "word {x}");
    }
}

/// An f16 bit pattern's value (finite patterns only).
fn f16_value(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let mant = f64::from(h & 0x3ff);
    let mag =
        if exp == 0 { mant * 2f64.powi(-24) } else { (1.0 + mant / 1024.0) * 2f64.powi(exp - 15) };
    sign * mag
}

#[test]
fn device_top_k_keys_order_values_like_total_cmp() {
    let bin = harness();
    let mut rng = StdRng::seed_from_u64(14);
    // f32: finite values and both zeros.
    let mut xs: Vec<f32> =
        vec![0.0, -0.0, f32::MAX, f32::MIN, f32::MIN_POSITIVE, -f32::from_bits(1)];
    while xs.len() < 20_000 {
        let v = f32::from_bits(rng.random());
        if v.is_finite() {
            xs.push(v);
        }
    }
    let input: Vec<u8> = xs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    let keys = words(&run(&bin, "key_f32", input, xs.len(), 4));
    check_order(&xs.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(), &xs, &keys, "f32");
    // bf16 values, held in f32 as the kernel holds them.
    let bf: Vec<f32> = (0..20_000)
        .map(|_| f32::from_bits(u32::from(rng.random::<u16>()) << 16))
        .filter(|v| v.is_finite())
        .chain([0.0, -0.0])
        .collect();
    let input: Vec<u8> = bf.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    let keys = words(&run(&bin, "key_bf16", input, bf.len(), 4));
    assert!(keys.iter().all(|&k| k <= 0xffff), "bf16 keys are 16-bit");
    check_order(&bf.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(), &bf, &keys, "bf16");
    // f16 bit patterns.
    let hs: Vec<u16> = (0..=u16::MAX).filter(|h| (h >> 10) & 0x1f != 0x1f).collect();
    let input: Vec<u8> = hs.iter().flat_map(|h| u32::from(*h).to_le_bytes()).collect();
    let keys = words(&run(&bin, "key_f16", input, hs.len(), 4));
    let values: Vec<f64> = hs.iter().map(|&h| f16_value(h)).collect();
    let signs: Vec<f32> = hs.iter().map(|&h| if h & 0x8000 != 0 { -0.0 } else { 0.0 }).collect();
    check_order(&values, &signs, &keys, "f16");
}

/// Keys must order the values exactly as `total_cmp` does (-0 below +0); only
/// the sign of `sign_of` is used, to tell the zeros apart.
fn check_order(values: &[f64], sign_of: &[f32], keys: &[u32], what: &str) {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| {
        values[a]
            .partial_cmp(&values[b])
            .unwrap()
            .then_with(|| sign_of[a].is_sign_positive().cmp(&sign_of[b].is_sign_positive()))
    });
    for w in idx.windows(2) {
        let (a, b) = (w[0], w[1]);
        let same = values[a] == values[b]
            && sign_of[a].is_sign_positive() == sign_of[b].is_sign_positive();
        if same {
            assert_eq!(keys[a], keys[b], "{what}: equal values, different keys");
        } else {
            assert!(
                keys[a] < keys[b],
                "{what}: {} < {} but keys {} >= {}",
                values[a],
                values[b],
                keys[a],
                keys[b]
            );
        }
    }
}
