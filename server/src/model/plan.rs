//! How a batch's attention runs, decided once for all layers: the segments
//! the fused CPU kernel reads, or, elsewhere (GPU, bf16), tiles of at most
//! [`DEFAULT_ATTENTION_TILE_ELEMENTS`] scores with their causal and
//! sliding-window masks.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::{
    ModelError, PackedBatch,
    attention_cpu::{Segment, first_visible_key},
};

/// Scores per attention tile, at most (heads × query rows × keys), unless a
/// test sets another bound with [`super::Teacher::set_attention_tile_elements`]:
/// bounds the memory of attention to O(chunk × len) instead of O(len²) per head.
pub const DEFAULT_ATTENTION_TILE_ELEMENTS: usize = 1 << 25;

/// One attention tile: a chunk of one sequence's queries against its keys.
pub(super) struct Tile {
    /// The query rows (token indices of the batch).
    pub(super) queries: Range<usize>,
    /// The first key row the tile reads; its keys end where its queries do.
    pub(super) keys_start: usize,
    /// [queries, keys] of 0 / -inf (f32).
    pub(super) mask: Tensor,
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
pub(super) struct AttentionPlan {
    /// The batch's segments (for the fused kernel).
    pub(super) segments: Vec<Segment>,
    tiles: Vec<(Option<usize>, Vec<Tile>)>,
}

impl AttentionPlan {
    /// Tiles of at most `tile_elements` scores (heads × query rows × keys),
    /// at least one query row each.
    /// With `tiled` false, no tiles (the fused kernel needs only the sequences).
    pub(super) fn new(
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

    pub(super) fn tiles(&self, window: Option<usize>) -> &[Tile] {
        &self.tiles.iter().find(|(w, _)| *w == window).expect("a plan for every window").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
