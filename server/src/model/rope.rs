//! Rotary position embeddings: the inverse frequencies as transformers
//! computes them (with linear or Llama 3 scaling), and the cos / sin tables of
//! a batch's positions, cached on the device.

use std::sync::Mutex;

use candle_core::{Device, Tensor};

use super::{ModelConfig, Rope, RopeScaling};

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

/// A model's RoPE frequencies, global and (Gemma 3) local, and the tables of
/// positions 0..L built from them so far.
pub(super) struct RopeTables {
    device: Device,
    inv_freq: Vec<f32>,
    inv_freq_local: Option<Vec<f32>>,
    /// RoPE tables of positions 0..len, global and local.
    cache: Mutex<[Option<RopeTable>; 2]>,
}

impl RopeTables {
    /// The frequencies of `config` (at its head dimension), tables on `device`.
    pub(super) fn new(config: &ModelConfig, device: &Device) -> Self {
        let hd = config.head_dim;
        Self {
            device: device.clone(),
            inv_freq: inverse_frequencies(&config.rope, hd),
            inv_freq_local: config.rope_local.as_ref().map(|r| inverse_frequencies(r, hd)),
            cache: Mutex::new([None, None]),
        }
    }

    /// Whether the model has local-attention frequencies.
    pub(super) fn has_local(&self) -> bool {
        self.inv_freq_local.is_some()
    }

    /// cos and sin tables [tokens, head_dim / 2] (f32) for the batch positions,
    /// rows of a table of positions 0..L kept on the device (`local` picks the
    /// local-attention frequencies) and grown to the next power of two when a
    /// longer sequence comes, so a batch neither computes nor uploads them.
    pub(super) fn tables(
        &self,
        positions: &[u32],
        local: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let inv_freq = if local {
            self.inv_freq_local.as_ref().expect("local RoPE frequencies: this is a bug")
        } else {
            &self.inv_freq
        };
        let needed = positions.iter().max().map_or(1, |&p| p as usize + 1);
        let mut cache = self.cache.lock().expect("RoPE cache lock poisoned: this is a bug");
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
