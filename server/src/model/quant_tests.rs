//! The quantized matrices against exact math: y = x Wᵀ in f64 with W the
//! dequantised blocks (candle's `dequantize`, the same values transformers'
//! `gguf` reader gives; the GGUF fixture tests check that). Widened for each
//! call and multiplied in f32, an output may differ from exact math only by
//! f32 summation: 1e-5 of Σ |W_ji x_i| (k = 512 products).

use candle_core::{Device, Tensor, quantized::GgmlDType};

use super::{QWeight, QuantData, Stored};

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

const TYPES: [GgmlDType; 12] = [
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
    GgmlDType::BF16,
    GgmlDType::F16,
];

/// W [n, k] quantized to `dtype` by candle, as a file would hold it, and its
/// dequantised values (in f64).
fn weight(dtype: GgmlDType, n: usize, k: usize) -> (QuantData, Vec<f64>) {
    let w = Tensor::from_vec(random((n, k), 7), (n, k), &Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&w, dtype).unwrap();
    let dense =
        q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bytes = q.data().unwrap().into_owned();
    (
        QuantData { dtype, shape: (n, k), bytes: Stored::Owned(bytes) },
        dense.into_iter().map(f64::from).collect(),
    )
}

#[test]
fn quantized_matmul_is_exact_math_to_f32_summation() {
    let (m, n, k) = (5, 48, 512);
    let mut x = random((m, k), 3);
    x[17] = 9.0;
    x[k + 300] = -14.0;
    for dtype in TYPES {
        let (data, wd) = weight(dtype, n, k);
        let w = QWeight::new(data, &Device::Cpu).unwrap();
        assert_eq!(w.dtype(), dtype);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let y = w.matmul_t(&xt).unwrap().to_vec2::<f32>().unwrap();
        // By bands of 16 rows (three bands).
        let QWeight::Cpu(cpu) = &w else { unreachable!() };
        let bands = cpu.matmul(&xt, 16 * k).unwrap().to_vec2::<f32>().unwrap();
        let (mut worst, mut caught) = (0f64, 0usize);
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for j in 0..n {
                let dot = |row: usize| -> (f64, f64) {
                    let wr = &wd[row * k..(row + 1) * k];
                    let exact = wr.iter().zip(xr).map(|(w, x)| w * f64::from(*x)).sum();
                    let abs = wr.iter().zip(xr).map(|(w, x)| (w * f64::from(*x)).abs()).sum();
                    (exact, abs)
                };
                let (exact, abs) = dot(j);
                let bound = 1e-5 * abs;
                for (how, got) in [("whole", y[r][j]), ("bands", bands[r][j])] {
                    let err = (f64::from(got) - exact).abs();
                    assert!(
                        err <= bound,
                        "{dtype:?} {how} row {r} column {j}: {got} vs exact {exact} (|diff| {err:e} > {bound:e})"
                    );
                    worst = worst.max(err / bound);
                }
                // The bound is tight: the next row of W would break it.
                caught += usize::from((dot((j + 1) % n).0 - exact).abs() > bound);
            }
        }
        assert_eq!(
            caught,
            m * n,
            "{dtype:?}: a wrong row would pass at {} outputs",
            m * n - caught
        );
        eprintln!("{dtype:?}: worst |diff| / bound = {worst:.3}");
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
    let p = data.permute_rows(|r| 7 - r).unwrap();
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
    let Stored::Owned(bytes) = &mut data.bytes else { unreachable!() };
    bytes.pop();
    let err = QWeight::new(data, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("cannot be"), "{err}");
}
