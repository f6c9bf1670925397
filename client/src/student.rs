//! A small Llama-style student for examples and tests: token embedding (tied
//! with the LM head), pre-norm decoder layers with causal self-attention (RoPE)
//! and a SiLU-gated MLP. Built from composed candle ops only (no fused
//! softmax / rms_norm / rope, which have no backward), so it trains on any
//! candle device. Weights are initialised from a seed, reproducibly.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use rand::{SeedableRng, rngs::StdRng};

/// Shape of the student.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StudentConfig {
    /// Vocabulary (the teacher's, since they share a tokenizer).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Longest input.
    pub max_len: usize,
}

struct Layer {
    attn_norm: Var,
    wq: Var,
    wk: Var,
    wv: Var,
    wo: Var,
    mlp_norm: Var,
    gate: Var,
    up: Var,
    down: Var,
}

/// The student model.
pub struct Student {
    config: StudentConfig,
    embed: Var,
    layers: Vec<Layer>,
    final_norm: Var,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

fn normal(rng: &mut StdRng, shape: (usize, usize), std: f64, device: &Device) -> Result<Var> {
    use rand::RngExt;
    let n = shape.0 * shape.1;
    // Box-Muller from the seeded generator.
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Var::from_tensor(&Tensor::from_vec(data, shape, device)?)
}

fn ones(n: usize, device: &Device) -> Result<Var> {
    Var::from_tensor(&Tensor::ones(n, DType::F32, device)?)
}

/// x · w / sqrt(mean(x²) + ε), composed.
fn rms_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
    x.broadcast_div(&r)?.broadcast_mul(w)
}

/// softmax over the last dimension, composed (the max shift held constant).
fn softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn linear(x: &Tensor, w: &Var) -> Result<Tensor> {
    x.broadcast_matmul(&w.as_tensor().t()?)
}

impl Student {
    /// A student with weights drawn from `seed`.
    pub fn new(config: StudentConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, m) = (config.hidden_size, config.intermediate_size);
        let lin = |rng: &mut StdRng, out: usize, inp: usize| {
            normal(rng, (out, inp), 1.0 / (inp as f64).sqrt(), device)
        };
        let embed = normal(&mut rng, (config.vocab_size, h), 0.02, device)?;
        let mut layers = Vec::new();
        for _ in 0..config.num_layers {
            layers.push(Layer {
                attn_norm: ones(h, device)?,
                wq: lin(&mut rng, h, h)?,
                wk: lin(&mut rng, h, h)?,
                wv: lin(&mut rng, h, h)?,
                wo: normal(&mut rng, (h, h), 0.5 / (h as f64).sqrt(), device)?,
                mlp_norm: ones(h, device)?,
                gate: lin(&mut rng, m, h)?,
                up: lin(&mut rng, m, h)?,
                down: normal(&mut rng, (h, m), 0.5 / (m as f64).sqrt(), device)?,
            });
        }
        let hd = h / config.num_heads;
        let (mut cos, mut sin) = (vec![], vec![]);
        for p in 0..config.max_len {
            for i in 0..hd / 2 {
                let angle = p as f64 / 10_000f64.powf(2.0 * i as f64 / hd as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let t = config.max_len;
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { -1e9 } else { 0.0 }).collect();
        Ok(Self {
            config,
            embed,
            layers,
            final_norm: ones(h, device)?,
            cos: Tensor::from_vec(cos, (t, hd / 2), device)?,
            sin: Tensor::from_vec(sin, (t, hd / 2), device)?,
            mask: Tensor::from_vec(mask, (t, t), device)?,
        })
    }

    /// Every trainable variable.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.embed.clone(), self.final_norm.clone()];
        for l in &self.layers {
            v.extend(
                [&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.mlp_norm, &l.gate, &l.up, &l.down]
                    .map(|x| x.clone()),
            );
        }
        v
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    fn rope(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        // x: [B, H, T, hd]; rotate the two halves (the transformers layout).
        let hd = x.dim(D::Minus1)?;
        let (x1, x2) = (x.narrow(D::Minus1, 0, hd / 2)?, x.narrow(D::Minus1, hd / 2, hd / 2)?);
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[r1, r2], D::Minus1)
    }

    /// Logits [B·T, V] for token ids [B, T] (u32).
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let (h, nh) = (self.config.hidden_size, self.config.num_heads);
        let hd = h / nh;
        let mut x =
            self.embed.as_tensor().index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, h))?;
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        for l in &self.layers {
            let y = rms_norm(&x, l.attn_norm.as_tensor())?;
            let heads = |w: &Var| -> Result<Tensor> {
                linear(&y, w)?.reshape((b, t, nh, hd))?.transpose(1, 2)
            };
            let q = self.rope(&heads(&l.wq)?, t)?;
            let k = self.rope(&heads(&l.wk)?, t)?;
            let v = heads(&l.wv)?.contiguous()?;
            let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? / (hd as f64).sqrt())?
                .broadcast_add(&mask)?;
            let a = softmax(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            x = (x + linear(&a, &l.wo)?)?;
            let y = rms_norm(&x, l.mlp_norm.as_tensor())?;
            let g = linear(&y, &l.gate)?;
            let silu = (&g * (g.neg()?.exp()? + 1.0)?.recip()?)?;
            x = (x + linear(&(silu * linear(&y, &l.up)?)?, &l.down)?)?;
        }
        let x = rms_norm(&x, self.final_norm.as_tensor())?.reshape((b * t, h))?;
        x.matmul(&self.embed.as_tensor().t()?)
    }
}
