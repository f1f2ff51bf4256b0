//! The shape of one attention call, its masks and positions, and the diagonal indexing that every
//! kernel shares.
//!
//! Query `i` sits at `q_offset + i`, key `j` at `k_offset + j`, and `δ_ij = c + i - j` with
//! `c = q_offset - k_offset`. Kernels index the diagonals of the `n_q x n_k` score matrix by
//! `g = j - i + n_q - 1` in `0..n_q + n_k - 1`, so that along a row `g` increases with `j` and a
//! tile's entries of one sequence are a contiguous slice: `δ(g) = c + n_q - 1 - g`.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Shapes, scale, masks and offsets of one call. Batch dims are flattened into `batch`; `hq` query
/// heads share `hk` key/value heads (`hq % hk == 0`, query head `h` reads kv head `h / (hq/hk)`).
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub batch: usize,
    pub hq: usize,
    pub hk: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f64,
    pub causal: bool,
    /// `(left, right)`: keep `-right <= δ <= left` (flash-attn's `window_size`).
    pub window: Option<(i64, i64)>,
    pub q_offset: i64,
    pub k_offset: i64,
}

impl Problem {
    pub fn validate(&self) -> Result<()> {
        if self.hk == 0 || !self.hq.is_multiple_of(self.hk) {
            return Err(Error::Value(format!(
                "k: expected a number of heads that divides q's {}, got {}",
                self.hq, self.hk
            )));
        }
        if !self.scale.is_finite() {
            return Err(Error::Value(format!(
                "scale: expected a finite float, got {}",
                self.scale
            )));
        }
        if let Some((l, r)) = self.window {
            if l < 0 || r < 0 {
                return Err(Error::Value(format!(
                    "window: expected non-negative (left, right), got ({l}, {r})"
                )));
            }
        }
        // Kernels index diagonals by `δ(g) = c + (n_q - 1 - g)` in i64: `c` and every δ of the
        // call must fit, and the lengths with room to spare (no array comes near 2^62 rows).
        const MAX_LEN: usize = 1 << 62;
        if self.nq > MAX_LEN || self.nk > MAX_LEN {
            return Err(Error::Value(format!(
                "q, k: expected at most 2^62 rows, got n_q = {}, n_k = {}",
                self.nq, self.nk
            )));
        }
        let c = self.q_offset as i128 - self.k_offset as i128;
        let (first, last) = (c + self.nq as i128 - 1, c - self.nk as i128 + 1);
        let fits = |x: i128| i64::MIN as i128 <= x && x <= i64::MAX as i128;
        if !(fits(c) && fits(first) && fits(last)) {
            return Err(Error::Value(format!(
                "q_offset, k_offset: expected relative positions (q_offset + i) - (k_offset + j) \
                 that fit in a 64-bit integer, got q_offset = {}, k_offset = {}, n_q = {}, n_k = {}",
                self.q_offset, self.k_offset, self.nq, self.nk
            )));
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.hq / self.hk
    }

    /// Number of diagonals `n_q + n_k - 1`.
    pub fn glen(&self) -> usize {
        (self.nq + self.nk).saturating_sub(1)
    }

    /// `δ` of diagonal `g`.
    #[inline]
    pub fn delta(&self, g: usize) -> i64 {
        // grouped so that no partial sum overflows when `validate` accepted the problem
        (self.q_offset - self.k_offset) + (self.nq as i64 - 1 - g as i64)
    }

    /// Whether the masks keep relative position `δ`.
    #[inline]
    pub fn keeps(&self, delta: i64) -> bool {
        if self.causal && delta < 0 {
            return false;
        }
        match self.window {
            Some((left, right)) => -right <= delta && delta <= left,
            None => true,
        }
    }

    /// The smallest and largest `δ` of a visible pair, or `None` when every pair is masked.
    pub fn visible_delta_range(&self) -> Option<(i64, i64)> {
        if self.nq == 0 || self.nk == 0 {
            return None;
        }
        // In i128: also defined (clamped to i64) for a problem `validate` refuses.
        let c = self.q_offset as i128 - self.k_offset as i128;
        let mut lo = c - (self.nk as i128 - 1);
        let mut hi = c + self.nq as i128 - 1;
        if self.causal {
            lo = lo.max(0);
        }
        if let Some((left, right)) = self.window {
            lo = lo.max(-(right as i128));
            hi = hi.min(left as i128);
        }
        let clamp = |x: i128| x.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        (lo <= hi).then_some((clamp(lo), clamp(hi)))
    }

    /// The number of visible `(query, key)` pairs of one head, in closed form.
    pub fn visible_pairs(&self) -> f64 {
        let Some((lo, hi)) = self.visible_delta_range() else {
            return 0.0;
        };
        let c = self.q_offset - self.k_offset;
        (self.pairs_at_most(hi - c) - self.pairs_at_most(lo - c - 1)) as f64
    }

    /// `#{(i, j): 0 <= i < n_q, 0 <= j < n_k, i - j <= t}`.
    fn pairs_at_most(&self, t: i64) -> i128 {
        let (nq, nk, t) = (self.nq as i128, self.nk as i128, t as i128);
        let mut total = 0;
        let full_hi = (nq - 1).min(t); // rows i <= t see every key
        if full_hi >= 0 {
            total += (full_hi + 1) * nk;
        }
        let (lo, hi) = ((t + 1).max(0), (nq - 1).min(t + nk - 1)); // rows seeing keys j >= i - t
        if hi >= lo {
            let count = hi - lo + 1;
            total += count * (nk + t) - (lo + hi) * count / 2;
        }
        total
    }
}

/// Cancellation and progress shared with the caller: kernels poll `cancelled()` between tiles.
#[derive(Debug, Default)]
pub struct Control {
    cancel: AtomicBool,
    serial: bool,
}

impl Control {
    pub fn new() -> Self {
        Self::default()
    }
    /// A control for a call that runs on the calling thread alone (kernels that would split
    /// their work over rayon's pool iterate instead).
    pub fn serial() -> Self {
        Self {
            serial: true,
            ..Self::default()
        }
    }
    #[inline]
    pub fn is_serial(&self) -> bool {
        self.serial
    }
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    #[inline]
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    pub fn check(&self) -> Result<()> {
        if self.cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(nq: usize, nk: usize, qo: i64, ko: i64) -> Problem {
        Problem {
            batch: 1,
            hq: 1,
            hk: 1,
            nq,
            nk,
            d: 2,
            dv: 1,
            scale: 1.0,
            causal: false,
            window: None,
            q_offset: qo,
            k_offset: ko,
        }
    }

    #[test]
    fn diagonal_indexing_matches_positions() {
        let pr = p(5, 7, 3, 1);
        for i in 0..5 {
            for j in 0..7 {
                let g = j + 5 - 1 - i;
                assert_eq!(pr.delta(g), (3 + i as i64) - (1 + j as i64));
            }
        }
    }

    #[test]
    fn visible_pairs_counts() {
        let mut pr = p(4, 6, 0, 0);
        assert_eq!(pr.visible_pairs(), 24.0);
        pr.causal = true;
        assert_eq!(pr.visible_pairs(), 4.0 + 3.0 + 2.0 + 1.0);
        pr.q_offset = 2; // bottom-right alignment
        assert_eq!(pr.visible_pairs(), 3.0 + 4.0 + 5.0 + 6.0);
        pr.window = Some((1, 0));
        assert_eq!(pr.visible_pairs(), 8.0);
        assert_eq!(pr.visible_delta_range(), Some((0, 1)));
    }

    #[test]
    fn visible_pairs_match_a_count_of_the_kept_pairs() {
        for (nq, nk) in [(1, 7), (5, 3), (6, 6), (4, 9)] {
            for (qo, ko) in [(0, 0), (3, 0), (0, 4), (8, 2)] {
                for causal in [false, true] {
                    for window in [None, Some((2, 1)), Some((0, 0)), Some((9, 9))] {
                        let mut pr = p(nq, nk, qo, ko);
                        pr.causal = causal;
                        pr.window = window;
                        let kept = (0..nq)
                            .flat_map(|i| (0..nk).map(move |j| (qo + i as i64) - (ko + j as i64)))
                            .filter(|&delta| pr.keeps(delta))
                            .count();
                        assert_eq!(pr.visible_pairs(), kept as f64, "{pr:?}");
                    }
                }
            }
        }
    }

    // Found by the `validate` fuzz target (fuzz/): these overflowed i64/usize arithmetic.
    #[test]
    fn offsets_whose_deltas_overflow_are_refused() {
        let pr = p(1, 1, i64::MAX, i64::MIN);
        assert!(pr.validate().is_err());
        assert_eq!(pr.visible_delta_range(), Some((i64::MAX, i64::MAX)));
        assert!(p(2, 1, i64::MAX, 0).validate().is_err()); // δ(0) = i64::MAX + 1
        assert!(p(1, 2, i64::MIN, 0).validate().is_err()); // δ = i64::MIN - 1
        assert!(p(1, 1, i64::MAX, 0).validate().is_ok());
        assert!(p(0, 1, i64::MAX, -1).validate().is_err()); // c itself overflows
        assert!(p(usize::MAX, 1, 0, 0).validate().is_err()); // glen and `n_q as i64` overflow
        let pr = p(1, 3, i64::MAX, 0);
        assert_eq!((pr.delta(0), pr.delta(2)), (i64::MAX, i64::MAX - 2));
        assert!(p(3, 3, i64::MIN / 4, i64::MAX / 4).validate().is_ok());
        assert!(p(3, 3, i64::MIN / 2, i64::MAX / 2).validate().is_err());
    }

    #[test]
    fn flops_of_huge_sizes_do_not_overflow() {
        let mut pr = p(1, 1, 0, 0);
        (pr.batch, pr.hq, pr.hk, pr.d, pr.dv) = (usize::MAX, usize::MAX, 1, usize::MAX, 1);
        assert!(crate::plan::cost::exact_flops_bound(&pr, true) > 1e38);
    }
}
