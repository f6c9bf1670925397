//! A decoder layer: its weights, loaded by name, and its forward (attention
//! and MLP with their norms and residuals), plus the linear layer and the
//! norms it is made of.

use candle_core::{DType, Tensor};

use super::{
    Activation, LayerKind, ModelConfig, ModelError,
    attention_cpu::{PackedCausalAttention, Segment},
    mlp_cpu::SiluMul,
    plan::{AttentionPlan, Tile},
    quant::QWeight,
    weights::Loader,
};

/// What a layer's forward reads besides its weights and input.
pub(super) struct Forward<'a> {
    /// The model's configuration.
    pub(super) config: &'a ModelConfig,
    /// The compute dtype.
    pub(super) dtype: DType,
    /// Query rows per work item of the fused CPU attention; `None`: tiles.
    pub(super) fused_query_block: Option<usize>,
    /// Whether the fused CPU SiLU · up runs (f32 on the CPU).
    pub(super) cpu_f32: bool,
}

/// A weight matrix W [out, in] as a linear layer multiplies by it (y = x Wᵀ).
/// Dense on the CPU it is kept transposed, [in, out] contiguous: `gemm` then
/// reads it in place, where the [out, in] layout has it repack the whole
/// matrix on every call (a fifth of the time of a 64-token forward).
pub(super) enum Matrix {
    /// Dense, [out, in], or [in, out] when `transposed`.
    Dense { w: Tensor, transposed: bool },
    /// Kept as the GGUF file stores it.
    Quantized(QWeight),
}

impl Matrix {
    /// `name` from `l`: quantized where the loader keeps it so, else dense in
    /// the compute dtype, transposed when `transpose` and on the CPU.
    pub(super) fn load(
        l: &mut Loader,
        name: &str,
        shape: [usize; 2],
        transpose: bool,
    ) -> Result<Self, ModelError> {
        Self::optional(l, name, shape, transpose)?
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// [`Self::load`], `None` when the source has no `name`.
    pub(super) fn optional(
        l: &mut Loader,
        name: &str,
        shape: [usize; 2],
        transpose: bool,
    ) -> Result<Option<Self>, ModelError> {
        if let Some(q) = l.quantized(name, shape)? {
            return Ok(Some(Self::Quantized(q)));
        }
        let Some(w) = l.optional(name, &shape)? else { return Ok(None) };
        l.note_dense_matrix(shape);
        Self::dense(w, transpose && l.device.is_cpu()).map(Some)
    }

    /// `w` [out, in], transposed in memory when `transposed`.
    pub(super) fn dense(w: Tensor, transposed: bool) -> Result<Self, ModelError> {
        let w = if transposed { w.t()?.contiguous()? } else { w };
        Ok(Self::Dense { w, transposed })
    }

    /// x Wᵀ: in x's dtype when dense, f32 when quantized.
    pub(super) fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense { w, transposed: true } => x.matmul(w),
            Self::Dense { w, transposed: false } => x.matmul(&w.t()?),
            Self::Quantized(q) => q.matmul_t(x),
        }
    }

    /// Rows `ids` of W (an embedding lookup): in the compute dtype when
    /// dense, f32 (dequantised) when quantized.
    pub(super) fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense { w, transposed: false } => w.index_select(ids, 0),
            Self::Dense { w, transposed: true } => w.t()?.index_select(ids, 0),
            Self::Quantized(q) => q.rows(ids),
        }
    }
}

/// A linear layer y = x Wᵀ + b.
pub(super) struct Linear {
    w: Matrix,
    b: Option<Tensor>,
}

impl Linear {
    fn load(
        l: &mut Loader,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        let w = Matrix::load(l, &format!("{name}.weight"), [out, inp], true)?;
        let b = if bias { Some(l.weight(&format!("{name}.bias"), &[out])?) } else { None };
        Ok(Self { w, b })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.w.matmul_t(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// RMSNorm computed in f32 with an f32 multiplier, returned in x's dtype.
pub(super) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, w, eps as f32)?.to_dtype(dtype)
}

pub(super) fn softcap(x: &Tensor, cap: Option<f64>) -> candle_core::Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x.clone()),
    }
}

pub(super) struct Layer {
    /// The sliding window, in tokens, of a local-attention layer.
    pub(super) window: Option<usize>,
    /// Whether the layer uses the local RoPE frequencies (Gemma 3).
    pub(super) local_rope: bool,
    attn_norm: Tensor,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    post_ffn_norm: Option<Tensor>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    /// Decoder layer `i` of kind `kind`, its weights from `l`.
    pub(super) fn load(
        l: &mut Loader,
        c: &ModelConfig,
        i: usize,
        kind: &LayerKind,
    ) -> Result<Self, ModelError> {
        let p = format!("model.layers.{i}");
        let (h, hd) = (c.hidden_size, c.head_dim);
        let gemma = c.arch.is_gemma();
        Ok(Layer {
            window: kind.window,
            local_rope: kind.local_rope,
            attn_norm: l.norm(&format!("{p}.input_layernorm.weight"), h)?,
            post_attn_norm: if gemma {
                Some(l.norm(&format!("{p}.post_attention_layernorm.weight"), h)?)
            } else {
                None
            },
            ffn_norm: if gemma {
                l.norm(&format!("{p}.pre_feedforward_layernorm.weight"), h)?
            } else {
                l.norm(&format!("{p}.post_attention_layernorm.weight"), h)?
            },
            post_ffn_norm: if gemma {
                Some(l.norm(&format!("{p}.post_feedforward_layernorm.weight"), h)?)
            } else {
                None
            },
            q: Linear::load(l, &format!("{p}.self_attn.q_proj"), c.num_heads * hd, h, c.qkv_bias)?,
            k: Linear::load(
                l,
                &format!("{p}.self_attn.k_proj"),
                c.num_kv_heads * hd,
                h,
                c.qkv_bias,
            )?,
            v: Linear::load(
                l,
                &format!("{p}.self_attn.v_proj"),
                c.num_kv_heads * hd,
                h,
                c.qkv_bias,
            )?,
            o: Linear::load(l, &format!("{p}.self_attn.o_proj"), h, c.num_heads * hd, c.o_bias)?,
            q_norm: if c.qk_norm {
                Some(l.norm(&format!("{p}.self_attn.q_norm.weight"), hd)?)
            } else {
                None
            },
            k_norm: if c.qk_norm {
                Some(l.norm(&format!("{p}.self_attn.k_norm.weight"), hd)?)
            } else {
                None
            },
            gate: Linear::load(
                l,
                &format!("{p}.mlp.gate_proj"),
                c.intermediate_size,
                h,
                c.mlp_bias,
            )?,
            up: Linear::load(l, &format!("{p}.mlp.up_proj"), c.intermediate_size, h, c.mlp_bias)?,
            down: Linear::load(
                l,
                &format!("{p}.mlp.down_proj"),
                h,
                c.intermediate_size,
                c.mlp_bias,
            )?,
        })
    }
}

impl Layer {
    /// The layer's output for `x` [tokens, hidden]: attention (fused on the
    /// CPU in f32, else by `plan`'s tiles) and MLP, each with its norms and
    /// residual.
    pub(super) fn forward(
        &self,
        f: &Forward<'_>,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        plan: &AttentionPlan,
    ) -> candle_core::Result<Tensor> {
        let eps = f.config.rms_norm_eps;
        let h = rms_norm(x, &self.attn_norm, eps)?;
        let mut a = match f.fused_query_block {
            Some(block) => self.fused_attention(f, &h, rope, &plan.segments, block)?,
            None => self.attention(f, &h, rope, plan.tiles(self.window))?,
        };
        if let Some(w) = &self.post_attn_norm {
            a = rms_norm(&a, w, eps)?;
        }
        let x = (x + a)?;
        let h = rms_norm(&x, &self.ffn_norm, eps)?;
        let (gate, up) = (self.gate.forward(&h)?, self.up.forward(&h)?);
        let act = match f.config.activation {
            Activation::Silu if f.cpu_f32 => gate.apply_op2_no_bwd(&up, &SiluMul)?,
            Activation::Silu => (gate.silu()? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Gelu => (gate.gelu_erf()? * up)?,
        };
        let mut m = self.down.forward(&act)?;
        if let Some(w) = &self.post_ffn_norm {
            m = rms_norm(&m, w, eps)?;
        }
        x + m
    }

    /// q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim]: the
    /// projections of `x`, q and k normed where the model norms them.
    fn qkv(&self, f: &Forward<'_>, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = f.config;
        let (n, nh, nkv, hd) = (x.dim(0)?, c.num_heads, c.num_kv_heads, c.head_dim);
        let mut q = self.q.forward(x)?.reshape((n, nh, hd))?;
        let mut k = self.k.forward(x)?.reshape((n, nkv, hd))?;
        let v = self.v.forward(x)?.reshape((n, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(&q, qn, c.rms_norm_eps)?;
            k = rms_norm(&k, kn, c.rms_norm_eps)?;
        }
        Ok((q, k, v))
    }

    /// [`Self::attention`] with the fused CPU kernel: q, k and v stay in the
    /// projections' [tokens, heads, head_dim] layout (RoPE applied in place of
    /// the transposes), and the kernel writes [tokens, heads × head_dim].
    fn fused_attention(
        &self,
        f: &Forward<'_>,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        segments: &[Segment],
        query_block: usize,
    ) -> candle_core::Result<Tensor> {
        let c = f.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (q, k, v) = self.qkv(f, x)?;
        let rotate = |t: &Tensor| -> candle_core::Result<Tensor> {
            candle_nn::rotary_emb::rope_thd(&t.contiguous()?.unsqueeze(0)?, cos, sin)?.squeeze(0)
        };
        let op = PackedCausalAttention {
            segments: segments.to_vec(),
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            window: self.window,
            scale: c.attn_scale as f32,
            softcap: c.attn_softcap,
            query_block,
        };
        let attn = rotate(&q)?.apply_op3_no_bwd(&rotate(&k)?, &v.contiguous()?, &op)?;
        self.o.forward(&attn)
    }

    fn attention(
        &self,
        f: &Forward<'_>,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        tiles: &[Tile],
    ) -> candle_core::Result<Tensor> {
        let c = f.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let groups = nh / nkv;
        let (q, k, v) = self.qkv(f, x)?;
        // RoPE in f32 on [1, heads, tokens, head_dim].
        let rotate = |t: &Tensor| -> candle_core::Result<Tensor> {
            let t = t.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
            candle_nn::rotary_emb::rope(&t, cos, sin)?.squeeze(0)?.to_dtype(f.dtype)
        };
        let q = rotate(&q)?; // [nh, n, hd]
        let k = rotate(&k)?; // [nkv, n, hd]
        let v = v.transpose(0, 1)?.contiguous()?; // [nkv, n, hd]
        let mut outs = Vec::with_capacity(tiles.len());
        for tile in tiles {
            let rows = tile.queries.len();
            let keys = tile.queries.end - tile.keys_start;
            let qc = q.narrow(1, tile.queries.start, rows)?.contiguous()?.reshape((
                nkv,
                groups * rows,
                hd,
            ))?;
            let kc = k.narrow(1, tile.keys_start, keys)?.contiguous()?;
            let vc = v.narrow(1, tile.keys_start, keys)?.contiguous()?;
            let scores = (qc.matmul(&kc.t()?)?.to_dtype(DType::F32)? * c.attn_scale)?;
            let scores = softcap(&scores, c.attn_softcap)?;
            let scores = scores.reshape((nkv, groups, rows, keys))?.broadcast_add(&tile.mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(f.dtype)?;
            let out = probs.reshape((nkv, groups * rows, keys))?.matmul(&vc)?;
            outs.push(
                out.reshape((nh, rows, hd))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((rows, nh * hd))?,
            );
        }
        let attn = Tensor::cat(&outs, 0)?;
        self.o.forward(&attn)
    }
}
