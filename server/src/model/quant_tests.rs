//! The quantized matmul against exact math: y = x Wᵀ in f64 with W the
//! dequantised blocks, and a bound derived from how the activations are
//! rounded (not from candle's code): each row of x is quantized to 8 bits per
//! block of the weight type's size (32, or 256 for the K types), so an
//! element moves by at most half a step d = max|x in its block| / 127, plus
//! the rounding of d itself (stored as f16 in Q8_0 and Q8_1: a relative
//! 2⁻¹¹ of the element). Hence |Δy_j| ≤ Σ_i |W_ji| (d_b(i)/2 + |x_i| 2⁻¹⁰),
//! plus f32 summation (1e-5 of Σ |W_ji x_i|).

use candle_core::{Device, Tensor, quantized::GgmlDType};

use super::{QWeight, QuantData};

fn random(shape: (usize, usize), seed: u64) -> Vec<f32> {
    // A small xorshift: reproducible, no dependency.
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..shape.0 * shape.1)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        })
        .collect()
}

const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// W [n, k] quantized to `dtype` by candle, as a file would hold it, and its
/// dequantised values.
fn weight(dtype: GgmlDType, n: usize, k: usize) -> (QuantData, Vec<f64>) {
    let w = Tensor::from_vec(random((n, k), 7), (n, k), &Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&w, dtype).unwrap();
    let dense =
        q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bytes = q.data().unwrap().into_owned();
    (QuantData { dtype, shape: (n, k), bytes }, dense.into_iter().map(f64::from).collect())
}

#[test]
fn quantized_matmul_is_within_the_activation_rounding_of_exact_math() {
    let (m, n, k) = (5, 48, 512);
    let mut x = random((m, k), 3);
    // Outliers, as real activations have: they coarsen their block's step.
    x[17] = 9.0;
    x[k + 300] = -14.0;
    for dtype in TYPES {
        let (data, wd) = weight(dtype, n, k);
        let block = if dtype.block_size() == 256 { 256 } else { 32 };
        let w = QWeight::new(data, &Device::Cpu).unwrap();
        assert_eq!(w.dtype(), dtype);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let y = w.matmul_t(&xt).unwrap().to_vec2::<f32>().unwrap();
        let (mut worst, mut moved, mut caught) = (0f64, 0usize, 0usize);
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let step: Vec<f64> = xr
                .chunks(block)
                .map(|b| b.iter().fold(0f64, |a, v| a.max(f64::from(v.abs()))) / 127.0)
                .collect();
            for j in 0..n {
                let wr = &wd[j * k..(j + 1) * k];
                let exact: f64 = wr.iter().zip(xr).map(|(w, x)| w * f64::from(*x)).sum();
                let next = &wd[(j + 1) % n * k..((j + 1) % n + 1) * k];
                let wrong_row: f64 = next.iter().zip(xr).map(|(w, x)| w * f64::from(*x)).sum();
                let abs: f64 = wr.iter().zip(xr).map(|(w, x)| (w * f64::from(*x)).abs()).sum();
                let bound = wr
                    .iter()
                    .zip(xr)
                    .enumerate()
                    .map(|(i, (w, x))| {
                        w.abs() * (step[i / block] / 2.0 + f64::from(x.abs()) / 1024.0)
                    })
                    .sum::<f64>()
                    + 1e-5 * abs;
                let err = (f64::from(y[r][j]) - exact).abs();
                assert!(
                    err <= bound,
                    "{dtype:?} row {r} column {j}: {} vs exact {exact} (|diff| {err:e} > bound {bound:e})",
                    y[r][j]
                );
                worst = worst.max(err / bound);
                moved += usize::from(err > 1e-4 * abs);
                caught += usize::from((wrong_row - exact).abs() > bound);
            }
        }
        // The activations really are rounded (exact math would not move), and
        // the bound is tight enough that the next row's output would break it.
        assert!(moved > m * n / 2, "{dtype:?}: only {moved} of {} outputs moved", m * n);
        assert!(caught * 4 > m * n * 3, "{dtype:?}: a wrong row caught {caught} of {}", m * n);
        eprintln!(
            "{dtype:?}: worst |diff| / bound = {worst:.2}; a wrong row breaks it at {caught} of {}",
            m * n
        );
    }
}

#[test]
fn embedding_rows_are_the_dequantised_rows() {
    for dtype in TYPES {
        let (data, wd) = weight(dtype, 40, 256);
        let w = QWeight::new(data, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[3u32, 0, 39, 3], &Device::Cpu).unwrap();
        let rows = w.rows(&ids).unwrap().to_vec2::<f32>().unwrap();
        for (row, id) in rows.iter().zip([3usize, 0, 39, 3]) {
            let want: Vec<f32> = wd[id * 256..(id + 1) * 256].iter().map(|v| *v as f32).collect();
            assert_eq!(row, &want, "{dtype:?} row {id}");
        }
        let err = w.rows(&Tensor::new(&[40u32], &Device::Cpu).unwrap()).unwrap_err();
        assert!(err.to_string().contains("row 40 of a 40-row"), "{dtype:?}: {err}");
    }
}

#[test]
fn permuted_rows_move_whole_rows() {
    let (data, wd) = weight(GgmlDType::Q4K, 8, 256);
    let p = data.permute_rows(|r| 7 - r);
    let w = QWeight::new(p, &Device::Cpu).unwrap();
    let ids = Tensor::arange(0u32, 8, &Device::Cpu).unwrap();
    let rows = w.rows(&ids).unwrap().to_vec2::<f32>().unwrap();
    for (r, row) in rows.iter().enumerate() {
        let src = 7 - r;
        let want: Vec<f32> = wd[src * 256..(src + 1) * 256].iter().map(|v| *v as f32).collect();
        assert_eq!(row, &want, "row {r}");
    }
}

#[test]
fn a_short_buffer_is_an_error() {
    let (mut data, _) = weight(GgmlDType::Q8_0, 4, 64);
    data.bytes.pop();
    let err = QWeight::new(data, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("cannot be"), "{err}");
}
