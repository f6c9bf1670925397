//! The transformer itself: embeddings, decoder layers, final norm, LM head.

use std::{ops::Range, path::Path, time::Instant};

use candle_core::{DType, Device, Tensor};

use super::{
    Activation, LayerKind, ModelConfig, ModelError, Rope, RopeScaling,
    attention_cpu::{DEFAULT_QUERY_BLOCK, PackedCausalAttention, Segment, first_visible_key},
    mlp_cpu::SiluMul,
    weights::{Loader, SafetensorsSource, WeightSource},
};

/// Scores per attention tile, at most (heads × query rows × keys), unless a
/// test sets another bound with [`Teacher::set_attention_tile_elements`]:
/// bounds the memory of attention to O(chunk × len) instead of O(len²) per head.
pub const DEFAULT_ATTENTION_TILE_ELEMENTS: usize = 1 << 25;

/// Sequences concatenated into one token stream, nothing padded. Without
/// sharing ([`PackedBatch::new`]) sequence s is one [`Segment`] of its own,
/// positions and causal attention restarting at its first token. With sharing
/// ([`PackedBatch::sharing_prefixes`]) the leading tokens that several
/// sequences have in common are packed once, as a segment of their own, and
/// each sequence's remaining tokens follow as a segment whose context is that
/// prefix: it attends to the prefix's keys and its own, its positions continue
/// from the prefix's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    tokens: Vec<u32>,
    segments: Vec<Segment>,
    /// Per sequence: its shared prefix's tokens (empty when it shares none)
    /// and the tokens after it (empty when the prefix is all of it).
    sequences: Vec<(Range<usize>, Range<usize>)>,
}

impl PackedBatch {
    /// Packs `sequences`, none of them empty, one segment each.
    pub fn new<S: AsRef<[u32]>>(sequences: &[S]) -> Result<Self, ModelError> {
        Self::sharing_prefixes(sequences, 0)
    }

    /// Packs `sequences`, none of them empty, sharing prefixes: sequences
    /// whose leading tokens are equal for at least `min_prefix` tokens form
    /// groups, and each group packs its members' longest common prefix once.
    /// `min_prefix` 0 shares nothing. See [`share_groups`] for how groups are
    /// chosen; the packing depends only on the sequences.
    pub fn sharing_prefixes<S: AsRef<[u32]>>(
        sequences: &[S],
        min_prefix: usize,
    ) -> Result<Self, ModelError> {
        if let Some(i) = sequences.iter().position(|s| s.as_ref().is_empty()) {
            return Err(ModelError::Batch(format!("sequence {i} is empty")));
        }
        if sequences.is_empty() {
            return Err(ModelError::Batch("no sequences".into()));
        }
        let slices: Vec<&[u32]> = sequences.iter().map(AsRef::as_ref).collect();
        // The shared prefix length of each sequence's group (0: none), and
        // the group's first member.
        let mut shared = vec![(0usize, 0usize); sequences.len()];
        for (len, members) in share_groups(&slices, min_prefix) {
            let leader = *members.iter().min().expect("groups have two members or more");
            for m in members {
                shared[m] = (len, leader);
            }
        }
        let mut tokens = Vec::new();
        let mut segments = Vec::new();
        let mut packed: Vec<(Range<usize>, Range<usize>)> = Vec::with_capacity(sequences.len());
        for (i, s) in sequences.iter().enumerate() {
            let s = s.as_ref();
            let (len, leader) = shared[i];
            let prefix = if len == 0 {
                tokens.len()..tokens.len()
            } else if leader == i {
                let at = tokens.len();
                tokens.extend_from_slice(&s[..len]);
                segments.push(Segment::alone(at..tokens.len()));
                at..tokens.len()
            } else {
                packed[leader].0.clone()
            };
            let at = tokens.len();
            tokens.extend_from_slice(&s[len..]);
            let own = at..tokens.len();
            if !own.is_empty() {
                segments.push(Segment { tokens: own.clone(), context: prefix.clone() });
            }
            packed.push((prefix, own));
        }
        Ok(Self { tokens, segments, sequences: packed })
    }

    /// All tokens, as packed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of tokens packed (a shared prefix counted once).
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Tokens of all the sequences, a shared prefix counted for each.
    pub fn num_sequence_tokens(&self) -> usize {
        (0..self.num_sequences()).map(|s| self.sequence_len(s)).sum()
    }

    /// Tokens not packed because they were shared: the forward's saving.
    pub fn tokens_shared(&self) -> usize {
        self.num_sequence_tokens() - self.num_tokens()
    }

    /// Number of sequences.
    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    /// The segments the attention runs over, in packed order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The length of sequence `s`.
    pub fn sequence_len(&self, s: usize) -> usize {
        let (prefix, own) = &self.sequences[s];
        prefix.len() + own.len()
    }

    /// The packed tokens of sequence `s` after its shared prefix, i.e. all of
    /// them when it shares none (always so in a batch from [`Self::new`]).
    pub fn sequence(&self, s: usize) -> Range<usize> {
        self.sequences[s].1.clone()
    }

    /// The packed token (the row of the forward's output) at position `p` of
    /// sequence `s`; the rows of a shared prefix serve every sequence in its group.
    pub fn row(&self, s: usize, p: usize) -> usize {
        let (prefix, own) = &self.sequences[s];
        if p < prefix.len() { prefix.start + p } else { own.start + (p - prefix.len()) }
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        (0..self.num_sequences()).map(|s| self.sequence_len(s)).max().unwrap_or(0)
    }

    /// Whether a prefix is shared.
    pub fn shares_prefixes(&self) -> bool {
        self.segments.iter().any(|s| !s.context.is_empty())
    }

    /// The same sequences packed without sharing, and for every packed token
    /// of this batch a row of that one holding the same position of a
    /// sequence it serves.
    pub fn unshared(&self) -> Result<(PackedBatch, Vec<u32>), ModelError> {
        let sequences: Vec<Vec<u32>> = (0..self.num_sequences())
            .map(|s| (0..self.sequence_len(s)).map(|p| self.tokens[self.row(s, p)]).collect())
            .collect();
        let flat = PackedBatch::new(&sequences)?;
        let mut rows = vec![0u32; self.num_tokens()];
        for (s, seq) in sequences.iter().enumerate() {
            for p in 0..seq.len() {
                rows[self.row(s, p)] = flat.row(s, p) as u32;
            }
        }
        Ok((flat, rows))
    }

    fn positions(&self) -> Vec<u32> {
        self.segments
            .iter()
            .flat_map(|s| {
                let first = s.first_position() as u32;
                first..first + s.tokens.len() as u32
            })
            .collect()
    }
}

/// Most sequences in one shared-prefix group (a larger group is split, its
/// prefix packed once per part).
const MAX_GROUP: usize = 1024;

/// The groups of [`PackedBatch::sharing_prefixes`]: (shared length, members),
/// each of two members or more, every length at least `min_prefix` (> 0).
///
/// The sequences of at least `min_prefix` tokens are sorted, so that those
/// with a common prefix are neighbours and the common prefix of a run of
/// neighbours is the shortest common prefix of adjacent pairs in it. The runs
/// are then chosen to save the most tokens ((members − 1) × shared length),
/// by dynamic programming over the sorted order: rollouts of two prompts that
/// begin with the same system prompt form two groups, one per prompt, rather
/// than one group sharing the system prompt only. A group holds at most
/// [`MAX_GROUP`] sequences, so the work is O(n · MAX_GROUP) in the sequences
/// of at least `min_prefix` tokens, whatever the batch limits.
fn share_groups(sequences: &[&[u32]], min_prefix: usize) -> Vec<(usize, Vec<usize>)> {
    if min_prefix == 0 {
        return vec![];
    }
    let mut order: Vec<usize> =
        (0..sequences.len()).filter(|&i| sequences[i].len() >= min_prefix).collect();
    order.sort_by(|&a, &b| sequences[a].cmp(sequences[b]).then(a.cmp(&b)));
    let n = order.len();
    // lcp[i]: common prefix of sorted neighbours i and i + 1.
    let lcp: Vec<usize> = order
        .windows(2)
        .map(|w| {
            let (a, b) = (sequences[w[0]], sequences[w[1]]);
            a.iter().zip(b).take_while(|(x, y)| x == y).count()
        })
        .collect();
    // best[j]: most tokens saved by the first j sorted sequences; from[j]:
    // where the last run of that choice starts, and its shared length.
    let mut best = vec![0usize; n + 1];
    let mut from = vec![(0usize, 0usize); n + 1];
    for j in 1..=n {
        best[j] = best[j - 1];
        from[j] = (j - 1, 0);
        // Runs i..j of two sequences or more, their shared length falling
        // as the run grows to the left.
        let mut len = usize::MAX;
        for i in (j.saturating_sub(MAX_GROUP)..j - 1).rev() {
            len = len.min(lcp[i]);
            if len < min_prefix {
                break;
            }
            let saved = best[i] + (j - 1 - i) * len;
            if saved > best[j] {
                best[j] = saved;
                from[j] = (i, len);
            }
        }
    }
    let mut groups = vec![];
    let mut j = n;
    while j > 0 {
        let (i, len) = from[j];
        if j - i >= 2 {
            groups.push((len, order[i..j].to_vec()));
        }
        j = i;
    }
    groups
}

/// A linear layer y = x Wᵀ + b. On the CPU the weight is kept transposed,
/// [in, out] contiguous: `gemm` then reads it in place, where the [out, in]
/// layout has it repack the whole matrix on every call (a fifth of the time
/// of a 64-token forward).
struct Linear {
    /// [out, in], or [in, out] when `transposed`.
    w: Tensor,
    transposed: bool,
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
        let w = l.weight(&format!("{name}.weight"), &[out, inp])?;
        let transposed = l.device.is_cpu();
        let w = if transposed { w.t()?.contiguous()? } else { w };
        let b = if bias { Some(l.weight(&format!("{name}.bias"), &[out])?) } else { None };
        Ok(Self { w, transposed, b })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = if self.transposed { x.matmul(&self.w)? } else { x.matmul(&self.w.t()?)? };
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// RMSNorm computed in f32 with an f32 multiplier, returned in x's dtype.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, w, eps as f32)?.to_dtype(dtype)
}

fn softcap(x: &Tensor, cap: Option<f64>) -> candle_core::Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x.clone()),
    }
}

struct Layer {
    window: Option<usize>,
    local_rope: bool,
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
    fn load(
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

/// One attention tile: a chunk of one sequence's queries against its keys.
struct Tile {
    queries: Range<usize>,
    keys_start: usize,
    /// [queries, keys] of 0 / -inf (f32).
    mask: Tensor,
}

/// The mask of one tile, [queries, keys] of 0 / -inf (f32): query i sees key
/// j when j ≤ i and, with a window W, i − j < W. Built on the host.
fn mask_on_host(
    queries: Range<usize>,
    keys_start: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let keys = queries.end - keys_start;
    let mut mask = vec![0f32; queries.len() * keys];
    for (r, row) in mask.chunks_exact_mut(keys).enumerate() {
        let i = queries.start + r;
        for (c, m) in row.iter_mut().enumerate() {
            let j = keys_start + c;
            let visible = j <= i && window.is_none_or(|w| i - j < w);
            if !visible {
                *m = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(mask, (queries.len(), keys), device)
}

/// [`mask_on_host`] computed by tensor ops where the tensors live, so a GPU
/// neither waits for the host to fill the mask nor for its upload.
fn mask_on_device(
    queries: Range<usize>,
    keys_start: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (rows, keys) = (queries.len(), queries.end - keys_start);
    let i = Tensor::arange(queries.start as i64, queries.end as i64, device)?.reshape((rows, 1))?;
    let j = Tensor::arange(keys_start as i64, queries.end as i64, device)?.reshape((1, keys))?;
    let back = i.broadcast_sub(&j)?; // i − j
    let mut visible = back.ge(0i64)?;
    if let Some(w) = window {
        visible = (visible * back.lt(w as i64)?)?;
    }
    let open = Tensor::zeros((rows, keys), DType::F32, device)?;
    let shut = Tensor::full(f32::NEG_INFINITY, (rows, keys), device)?;
    visible.where_cond(&open, &shut)
}

/// How a batch's attention runs, shared by all layers: the segments for the
/// fused CPU kernel, or the tiles for each distinct window (of a batch that
/// shares no prefix).
struct AttentionPlan {
    segments: Vec<Segment>,
    tiles: Vec<(Option<usize>, Vec<Tile>)>,
}

impl AttentionPlan {
    /// Tiles of at most `tile_elements` scores (heads × query rows × keys),
    /// at least one query row each.
    /// With `tiled` false, no tiles (the fused kernel needs only the sequences).
    fn new(
        batch: &PackedBatch,
        windows: &[Option<usize>],
        heads: usize,
        tile_elements: usize,
        device: &Device,
        tiled: bool,
    ) -> Result<Self, ModelError> {
        let segments = batch.segments().to_vec();
        let mut tiles = Vec::new();
        let windows = if tiled { windows } else { &[] };
        if tiled && batch.shares_prefixes() {
            return Err(ModelError::Batch(
                "tiled attention runs batches that share no prefix: this is a bug".into(),
            ));
        }
        for &window in windows {
            let mut list = Vec::new();
            for seg in &segments {
                let seq = seg.tokens.clone();
                let len = seq.len();
                let chunk = (tile_elements / (heads * len)).clamp(1, len);
                let mut q0 = seq.start;
                while q0 < seq.end {
                    let q1 = (q0 + chunk).min(seq.end);
                    let keys_start = first_visible_key(q0, window, seq.start);
                    let mask = if device.is_cpu() {
                        mask_on_host(q0..q1, keys_start, window, device)?
                    } else {
                        mask_on_device(q0..q1, keys_start, window, device)?
                    };
                    list.push(Tile { queries: q0..q1, keys_start, mask });
                    q0 = q1;
                }
            }
            tiles.push((window, list));
        }
        Ok(Self { segments, tiles })
    }

    fn tiles(&self, window: Option<usize>) -> &[Tile] {
        &self.tiles.iter().find(|(w, _)| *w == window).expect("a plan for every window").1
    }
}

/// Whether the fused CPU kernels (attention, SiLU · up) run: f32 on the CPU.
fn cpu_f32(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// The teacher model, owning its weights on one device.
pub struct Teacher {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    lm_head: Option<Tensor>,
    final_norm: Tensor,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    inv_freq_local: Option<Vec<f32>>,
    /// Scores per attention tile, at most ([`DEFAULT_ATTENTION_TILE_ELEMENTS`]).
    attention_tile_elements: usize,
    /// Query rows per work item of the fused CPU attention; `None`: tiles.
    fused_query_block: Option<usize>,
    /// RoPE tables of positions 0..len, global and local.
    rope_cache: std::sync::Mutex<[Option<RopeTable>; 2]>,
    /// SHA-256 of the weights as loaded (hex; empty when not loaded from files).
    weights_sha256: String,
}

/// cos and sin of positions 0..len (f32, [len, head_dim / 2]).
struct RopeTable {
    len: usize,
    cos: Tensor,
    sin: Tensor,
}

/// Inverse RoPE frequencies, in f32 as transformers computes them.
fn inverse_frequencies(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            let base = 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64);
            let f = match rope.scaling {
                RopeScaling::None => base,
                RopeScaling::Linear { factor } => base / factor,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: old,
                } => {
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    let low_wavelen = old / low_freq_factor;
                    let high_wavelen = old / high_freq_factor;
                    if wavelen > low_wavelen {
                        base / factor
                    } else if wavelen < high_wavelen {
                        base
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * base / factor + smooth * base
                    }
                }
            };
            f as f32
        })
        .collect()
}

impl Teacher {
    /// Loads a teacher from a Hugging Face directory (config.json and
    /// safetensors) or a `.gguf` file, in `dtype` on `device`.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        // The forward's large, short-lived tensors: reuse freed memory instead of
        // a fresh mmap per tensor (see `crate::malloc`).
        crate::malloc::keep_tensor_memory();
        let started = Instant::now();
        let (config, mut source): (ModelConfig, Box<dyn WeightSource>) = if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            let config = ModelConfig::from_hf_json(&text)?;
            let source = SafetensorsSource::open(path, config.arch.is_gemma())?;
            (config, Box::new(source))
        } else if path.extension().is_some_and(|e| e == "gguf") {
            let (config, source) = super::gguf::open(path)?;
            (config, Box::new(source))
        } else if !path.exists() {
            return Err(ModelError::MissingFile(path.to_path_buf()));
        } else {
            return Err(ModelError::Config(format!(
                "{}: expected a Hugging Face model directory or a .gguf file",
                path.display()
            )));
        };
        tracing::info!(
            path = %path.display(),
            arch = config.arch.name(),
            layers = config.num_layers(),
            hidden = config.hidden_size,
            vocab = config.vocab_size,
            dtype = ?dtype,
            cpu_simd = crate::kernels::simd_build(),
            "loading teacher"
        );
        let digest = source.digest()?;
        let mut teacher = Self::from_source(config, source.as_mut(), device, dtype)?;
        teacher.weights_sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "teacher loaded");
        Ok(teacher)
    }

    fn from_source(
        config: ModelConfig,
        source: &mut dyn WeightSource,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let c = &config;
        let mut l = Loader { source, device: device.clone(), dtype, bytes: 0 };
        let (h, hd, v) = (c.hidden_size, c.head_dim, c.vocab_size);
        let embed = l.weight("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            // Some checkpoints mark embeddings untied yet ship no head; fall
            // back to the embedding as transformers does when it ties them.
            l.optional("lm_head.weight", &[v, h])?
        };
        let mut layers = Vec::with_capacity(c.num_layers());
        for (i, kind) in c.layers.iter().enumerate() {
            let started = Instant::now();
            let layer = Layer::load(&mut l, c, i, kind)?;
            tracing::debug!(layer = i, seconds = started.elapsed().as_secs_f64(), "layer loaded");
            layers.push(layer);
        }
        let final_norm = l.norm("model.norm.weight", h)?;
        tracing::info!(bytes = l.bytes, "weights placed on {:?}", device.location());
        let inv_freq = inverse_frequencies(&c.rope, hd);
        let inv_freq_local = c.rope_local.as_ref().map(|r| inverse_frequencies(r, hd));
        Ok(Self {
            config,
            device: device.clone(),
            dtype,
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq,
            inv_freq_local,
            attention_tile_elements: DEFAULT_ATTENTION_TILE_ELEMENTS,
            // The fused kernel is CPU and f32 only; elsewhere the tiles.
            fused_query_block: cpu_f32(device, dtype).then_some(DEFAULT_QUERY_BLOCK),
            rope_cache: std::sync::Mutex::new([None, None]),
            weights_sha256: String::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// SHA-256 (hex) of the weights it was loaded from: of a GGUF file, the
    /// file's; of safetensors shards, over every tensor in name order (name,
    /// NUL, dtype, shape as u64 LE, bytes).
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Attention is computed in tiles of at most `elements` scores (heads ×
    /// query rows × keys; a tile holds at least one query row whatever the
    /// bound). The default, [`DEFAULT_ATTENTION_TILE_ELEMENTS`], is what the
    /// server uses; tests set small bounds to run many tiles per sequence.
    pub fn set_attention_tile_elements(&mut self, elements: usize) {
        self.attention_tile_elements = elements.max(1);
    }

    /// The bound on scores per attention tile.
    pub fn attention_tile_elements(&self) -> usize {
        self.attention_tile_elements
    }

    /// On the CPU in f32, attention runs fused (see
    /// [`PackedCausalAttention`](super::attention_cpu::PackedCausalAttention))
    /// in blocks of `query_block` query rows (at least 1; the server uses
    /// [`DEFAULT_QUERY_BLOCK`]); `None` makes it run in tiles of tensor ops as
    /// on a GPU, which tests use to compare the two. An error on a GPU or in
    /// another dtype, where only the tiles run.
    pub fn set_fused_cpu_attention(
        &mut self,
        query_block: Option<usize>,
    ) -> Result<(), ModelError> {
        if query_block.is_some() && !cpu_f32(&self.device, self.dtype) {
            return Err(ModelError::Config(format!(
                "the fused attention runs on the CPU in f32 only, not on {:?} in {:?}",
                self.device.location(),
                self.dtype
            )));
        }
        self.fused_query_block = query_block.map(|b| b.max(1));
        Ok(())
    }

    /// The fused CPU attention's query rows per work item, if it runs.
    pub fn fused_cpu_attention(&self) -> Option<usize> {
        self.fused_query_block
    }

    /// cos and sin tables [tokens, head_dim / 2] (f32) for the batch positions,
    /// rows of a table of positions 0..L kept on the device (`local` picks the
    /// local-attention frequencies) and grown to the next power of two when a
    /// longer sequence comes, so a batch neither computes nor uploads them.
    fn rope_tables(&self, positions: &[u32], local: bool) -> candle_core::Result<(Tensor, Tensor)> {
        let inv_freq = if local {
            self.inv_freq_local.as_ref().expect("local RoPE frequencies: this is a bug")
        } else {
            &self.inv_freq
        };
        let needed = positions.iter().max().map_or(1, |&p| p as usize + 1);
        let mut cache = self.rope_cache.lock().expect("RoPE cache lock poisoned: this is a bug");
        let slot = &mut cache[usize::from(local)];
        if slot.as_ref().is_none_or(|t| t.len < needed) {
            let len = needed.next_power_of_two();
            let half = inv_freq.len();
            let mut cos = Vec::with_capacity(len * half);
            let mut sin = Vec::with_capacity(len * half);
            for p in 0..len {
                for &f in inv_freq {
                    // The angle is an f32 product, as in transformers; cos and
                    // sin are then evaluated exactly and rounded once.
                    let angle = f64::from(p as f32 * f);
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
            *slot = Some(RopeTable {
                len,
                cos: Tensor::from_vec(cos, (len, half), &self.device)?,
                sin: Tensor::from_vec(sin, (len, half), &self.device)?,
            });
        }
        let table = slot.as_ref().expect("filled above");
        let idx = Tensor::from_slice(positions, positions.len(), &self.device)?;
        Ok((table.cos.index_select(&idx, 0)?, table.sin.index_select(&idx, 0)?))
    }

    /// Whether a forward shares prefixes ([`PackedBatch::sharing_prefixes`])
    /// in its attention: with the fused CPU kernel. Otherwise (the tiles a GPU
    /// runs) a batch that shares a prefix is run unshared, to the same result.
    pub fn shares_prefixes(&self) -> bool {
        self.fused_query_block.is_some()
    }

    /// Runs the packed batch through the model: the final-normed hidden states
    /// [tokens, hidden] in the compute dtype, a row per packed token.
    pub fn hidden_states(&self, batch: &PackedBatch) -> Result<Tensor, ModelError> {
        if batch.shares_prefixes() && !self.shares_prefixes() {
            let (flat, rows) = batch.unshared()?;
            let hidden = self.hidden_states(&flat)?;
            let rows = Tensor::from_vec(rows, batch.num_tokens(), &self.device)?;
            return Ok(hidden.index_select(&rows, 0)?);
        }
        let c = &self.config;
        if let Some((i, &t)) =
            batch.tokens().iter().enumerate().find(|(_, t)| **t as usize >= c.vocab_size)
        {
            return Err(ModelError::Batch(format!(
                "token {i} of the packed batch is {t}, outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let n = batch.num_tokens();
        let ids = Tensor::from_slice(batch.tokens(), n, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(scale) = c.embed_scale {
            // transformers multiplies by the scale rounded to the compute dtype.
            let s = Tensor::new(scale as f32, &self.device)?.to_dtype(self.dtype)?;
            x = x.broadcast_mul(&s)?;
        }
        let positions = batch.positions();
        let global = self.rope_tables(&positions, false)?;
        let local = match &self.inv_freq_local {
            Some(_) => Some(self.rope_tables(&positions, true)?),
            None => None,
        };
        let mut windows: Vec<Option<usize>> = self.layers.iter().map(|l| l.window).collect();
        windows.sort();
        windows.dedup();
        let plan = AttentionPlan::new(
            batch,
            &windows,
            c.num_heads,
            self.attention_tile_elements,
            &self.device,
            self.fused_query_block.is_none(),
        )?;
        for layer in &self.layers {
            let rope = match (&local, layer.local_rope) {
                (Some(local), true) => local,
                _ => &global,
            };
            x = self.layer_forward(layer, &x, rope, &plan)?;
        }
        Ok(rms_norm(&x, &self.final_norm, c.rms_norm_eps)?)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        plan: &AttentionPlan,
    ) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let h = rms_norm(x, &layer.attn_norm, eps)?;
        let mut a = match self.fused_query_block {
            Some(block) => self.fused_attention(layer, &h, rope, &plan.segments, block)?,
            None => self.attention(layer, &h, rope, plan.tiles(layer.window))?,
        };
        if let Some(w) = &layer.post_attn_norm {
            a = rms_norm(&a, w, eps)?;
        }
        let x = (x + a)?;
        let h = rms_norm(&x, &layer.ffn_norm, eps)?;
        let (gate, up) = (layer.gate.forward(&h)?, layer.up.forward(&h)?);
        let act = match self.config.activation {
            Activation::Silu if cpu_f32(&self.device, self.dtype) => {
                gate.apply_op2_no_bwd(&up, &SiluMul)?
            }
            Activation::Silu => (gate.silu()? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Gelu => (gate.gelu_erf()? * up)?,
        };
        let mut m = layer.down.forward(&act)?;
        if let Some(w) = &layer.post_ffn_norm {
            m = rms_norm(&m, w, eps)?;
        }
        x + m
    }

    /// q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim]: the
    /// projections of `x`, q and k normed where the model norms them.
    fn qkv(&self, layer: &Layer, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (n, nh, nkv, hd) = (x.dim(0)?, c.num_heads, c.num_kv_heads, c.head_dim);
        let mut q = layer.q.forward(x)?.reshape((n, nh, hd))?;
        let mut k = layer.k.forward(x)?.reshape((n, nkv, hd))?;
        let v = layer.v.forward(x)?.reshape((n, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
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
        layer: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        segments: &[Segment],
        query_block: usize,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (q, k, v) = self.qkv(layer, x)?;
        let rotate = |t: &Tensor| -> candle_core::Result<Tensor> {
            candle_nn::rotary_emb::rope_thd(&t.contiguous()?.unsqueeze(0)?, cos, sin)?.squeeze(0)
        };
        let op = PackedCausalAttention {
            segments: segments.to_vec(),
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            window: layer.window,
            scale: c.attn_scale as f32,
            softcap: c.attn_softcap,
            query_block,
        };
        let attn = rotate(&q)?.apply_op3_no_bwd(&rotate(&k)?, &v.contiguous()?, &op)?;
        layer.o.forward(&attn)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        tiles: &[Tile],
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let groups = nh / nkv;
        let (q, k, v) = self.qkv(layer, x)?;
        // RoPE in f32 on [1, heads, tokens, head_dim].
        let rotate = |t: &Tensor| -> candle_core::Result<Tensor> {
            let t = t.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
            candle_nn::rotary_emb::rope(&t, cos, sin)?.squeeze(0)?.to_dtype(self.dtype)
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
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
            let out = probs.reshape((nkv, groups * rows, keys))?.matmul(&vc)?;
            outs.push(
                out.reshape((nh, rows, hd))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((rows, nh * hd))?,
            );
        }
        let attn = Tensor::cat(&outs, 0)?;
        layer.o.forward(&attn)
    }

    /// Logits [rows, V] in f32 for the given hidden-state rows (final soft-cap
    /// applied).
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.head_matmul(hidden_rows)?.to_dtype(DType::F32)?;
        Ok(softcap(&logits, self.config.final_softcap)?)
    }

    /// The LM head's logits [rows, V] of `hidden_rows` as the sampler backend
    /// reads them: straight from the matmul in the compute dtype, or in f32
    /// when a final soft-cap applies. Widened to f32 they are exactly
    /// [`Self::logits`] (widening is exact).
    pub fn head_logits(&self, hidden_rows: &Tensor) -> Result<Tensor, ModelError> {
        if self.config.final_softcap.is_some() {
            return self.logits(hidden_rows);
        }
        Ok(self.head_matmul(hidden_rows)?)
    }

    /// hidden_rows × the head (the embedding when tied), before any soft-cap.
    fn head_matmul(&self, hidden_rows: &Tensor) -> candle_core::Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        hidden_rows.matmul(&head.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_batch_positions_restart_at_each_sequence() {
        let b = PackedBatch::new(&[vec![5, 6, 7], vec![1], vec![2, 3]]).unwrap();
        assert_eq!(b.positions(), vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(b.sequence(2), 4..6);
        assert_eq!(b.max_len(), 3);
        assert!(PackedBatch::new(&[vec![1], vec![]]).is_err());
        assert!(PackedBatch::new::<Vec<u32>>(&[]).is_err());
    }

    /// Every sequence's tokens and positions are where `row` says, whatever
    /// was shared; the packed stream is shorter by exactly what was shared.
    fn assert_packs(sequences: &[Vec<u32>], b: &PackedBatch) {
        let positions = b.positions();
        assert_eq!(positions.len(), b.num_tokens());
        assert_eq!(b.num_sequences(), sequences.len());
        for (s, seq) in sequences.iter().enumerate() {
            assert_eq!(b.sequence_len(s), seq.len());
            for (p, &t) in seq.iter().enumerate() {
                assert_eq!(b.tokens()[b.row(s, p)], t, "sequence {s} position {p}");
                assert_eq!(positions[b.row(s, p)] as usize, p, "sequence {s} position {p}");
            }
        }
        let total: usize = sequences.iter().map(Vec::len).sum();
        assert_eq!(b.num_sequence_tokens(), total);
        assert_eq!(b.num_tokens() + b.tokens_shared(), total);
        // Segments tile the stream; a context is a whole segment of no context.
        let mut next = 0;
        for seg in b.segments() {
            assert_eq!(seg.tokens.start, next);
            next = seg.tokens.end;
            if !seg.context.is_empty() {
                assert!(
                    b.segments().iter().any(|o| o.tokens == seg.context && o.context.is_empty())
                );
            }
        }
        assert_eq!(next, b.num_tokens());
    }

    #[test]
    fn shared_prefixes_are_packed_once_and_every_position_stays_reachable() {
        let system: Vec<u32> = (100..140).collect(); // 40 tokens every sequence has
        let prompt = |p: u32| -> Vec<u32> {
            system.iter().copied().chain((0..60).map(|i| p * 1000 + i)).collect()
        };
        let rollout = |p: u32, r: u32, len: u32| -> Vec<u32> {
            prompt(p).into_iter().chain((0..len).map(|i| 50_000 + r * 100 + i)).collect()
        };
        // Two prompts' rollouts, interleaved, plus a sequence of the system
        // prompt alone, a short one and a copy of prompt 1 with nothing after.
        let mut seqs = vec![rollout(1, 0, 5), rollout(2, 0, 7), rollout(1, 1, 3)];
        seqs.extend([rollout(2, 1, 1), system.clone(), vec![7, 8], prompt(1), rollout(1, 2, 9)]);
        let b = PackedBatch::sharing_prefixes(&seqs, 32).unwrap();
        assert_packs(&seqs, &b);
        // Prompt 1 (100 tokens) is shared by 4 sequences, prompt 2 by 2. The
        // system prompt alone joins neither: with it a group would share 40
        // tokens, not 100.
        assert_eq!(b.tokens_shared(), 3 * 100 + 100);
        assert!(b.shares_prefixes());
        // A sequence that is its group's prefix packs no tokens of its own.
        assert!(b.sequence(6).is_empty());
        assert_eq!(b.row(6, 99), b.row(0, 99));

        // Nothing shared below the minimum, or with 0, or in groups of one.
        for min in [0, 101] {
            let b = PackedBatch::sharing_prefixes(&seqs, min).unwrap();
            assert_packs(&seqs, &b);
            assert_eq!(b.tokens_shared(), 0, "min {min}");
            assert!(!b.shares_prefixes());
        }
        assert_eq!(b.segments().len(), 2 + 8 - 1, "two prefixes, seven continuations");

        // Prefixes that differ in their last token share one token less.
        let mut a = rollout(3, 0, 4);
        let mut c = a.clone();
        c[99] += 1;
        a.truncate(100);
        let seqs = vec![a, c];
        let b = PackedBatch::sharing_prefixes(&seqs, 32).unwrap();
        assert_packs(&seqs, &b);
        assert_eq!(b.tokens_shared(), 99);

        // A group larger than MAX_GROUP is split (in sorted order), its prefix
        // packed once per part.
        let many: Vec<Vec<u32>> = (0..1100u32).map(|i| vec![7, 8, 1000 + i]).collect();
        let b2 = PackedBatch::sharing_prefixes(&many, 2).unwrap();
        assert_packs(&many, &b2);
        assert_eq!(b2.tokens_shared(), (1023 + 75) * 2);

        // The unshared batch holds every sequence whole; its rows map back.
        let (flat, rows) = b.unshared().unwrap();
        assert!(!flat.shares_prefixes());
        assert_eq!(flat.num_tokens(), b.num_sequence_tokens());
        for (r, &f) in rows.iter().enumerate() {
            assert_eq!(flat.tokens()[f as usize], b.tokens()[r]);
            assert_eq!(flat.positions()[f as usize], b.positions()[r]);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let rope = Rope {
            theta: 10_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = inverse_frequencies(&Rope { theta: 10_000.0, scaling: RopeScaling::None }, 128);
        let scaled = inverse_frequencies(&rope, 128);
        assert_eq!(scaled[0], plain[0], "wavelength 2π < 2048: kept");
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12, "longest wavelength: divided by 8");
    }

    #[test]
    fn masks_built_by_tensor_ops_equal_the_host_masks() {
        for window in [None, Some(1), Some(3), Some(100)] {
            for (queries, keys_start) in [(0..6, 0), (4..9, 2), (10..11, 10), (3..40, 0)] {
                let host = mask_on_host(queries.clone(), keys_start, window, &Device::Cpu).unwrap();
                let ops =
                    mask_on_device(queries.clone(), keys_start, window, &Device::Cpu).unwrap();
                assert_eq!(
                    host.to_vec2::<f32>().unwrap(),
                    ops.to_vec2::<f32>().unwrap(),
                    "window {window:?} queries {queries:?} keys from {keys_start}"
                );
            }
        }
    }

    #[test]
    fn attention_tiles_cover_every_query_once_within_the_bound() {
        let batch = PackedBatch::new(&[vec![0u32; 40], vec![0; 1], vec![0; 17]]).unwrap();
        let heads = 4;
        for bound in [1, 7, heads * 40, heads * 40 * 3 + 5, DEFAULT_ATTENTION_TILE_ELEMENTS] {
            for window in [None, Some(4)] {
                let plan = AttentionPlan::new(&batch, &[window], heads, bound, &Device::Cpu, true)
                    .unwrap();
                let tiles = plan.tiles(window);
                // In order, contiguous, every query of every sequence once.
                let mut next = 0;
                for tile in tiles {
                    assert_eq!(tile.queries.start, next, "bound {bound} window {window:?}");
                    assert!(!tile.queries.is_empty());
                    next = tile.queries.end;
                    let s = (0..3).find(|&s| batch.sequence(s).contains(&tile.queries.start));
                    let seq = batch.sequence(s.unwrap());
                    assert!(tile.queries.end <= seq.end, "a tile never spans two sequences");
                    let want_start = match window {
                        Some(w) => (tile.queries.start + 1).saturating_sub(w).max(seq.start),
                        None => seq.start,
                    };
                    assert_eq!(tile.keys_start, want_start);
                    let keys = tile.queries.end - tile.keys_start;
                    assert_eq!(tile.mask.dims(), [tile.queries.len(), keys]);
                    // Within the bound, or one query row when the bound is smaller.
                    assert!(
                        tile.queries.len() == 1 || heads * tile.queries.len() * seq.len() <= bound,
                        "bound {bound}: tile {:?}",
                        tile.queries
                    );
                }
                assert_eq!(next, batch.num_tokens());
                let want = if bound == DEFAULT_ATTENTION_TILE_ELEMENTS { 3 } else { 6 };
                assert!(tiles.len() >= want, "bound {bound}: {} tiles", tiles.len());
            }
        }
    }

    #[test]
    fn sliding_window_tiles_mask_exactly_the_last_w_keys() {
        let batch = PackedBatch::new(&[vec![0u32; 6]]).unwrap();
        let plan = AttentionPlan::new(
            &batch,
            &[Some(3)],
            1,
            DEFAULT_ATTENTION_TILE_ELEMENTS,
            &Device::Cpu,
            true,
        )
        .unwrap();
        let tile = &plan.tiles(Some(3))[0];
        let mask = tile.mask.to_vec2::<f32>().unwrap();
        for (i, row) in mask.iter().enumerate() {
            for (j, m) in row.iter().enumerate() {
                let j = tile.keys_start + j;
                assert_eq!(*m == 0.0, j <= i && i - j < 3, "query {i} key {j}");
            }
        }
    }
}
