//! `CandidateMask`: a subset of a decider's candidates, by position in `Decider::models()`.
//!
//! A request that needs tools, vision or a long context may only go to the candidates that can
//! serve it; the decider then applies its rule to that subset (`Decider::route_ids_among`)
//! instead of being rebuilt over it. The mask is a bitset: one `u64` holds up to 64 candidates
//! without allocating, which covers every realistic pool; more spill into a `Vec`.

use crate::error::{Result, RouterError};

const WORD: usize = 64;

/// A set of candidate positions `0..n_candidates` (`Decider::models()` order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateMask {
    n: usize,
    /// Positions 0..64: the whole mask up to 64 candidates, so the common case never allocates.
    low: u64,
    /// Positions 64.., 64 to a word; empty up to 64 candidates.
    high: Vec<u64>,
}

impl CandidateMask {
    /// No candidate of `n_candidates`.
    pub fn none(n_candidates: usize) -> Self {
        Self {
            n: n_candidates,
            low: 0,
            high: vec![0; n_candidates.saturating_sub(WORD).div_ceil(WORD)],
        }
    }

    /// Every candidate of `n_candidates`.
    pub fn all(n_candidates: usize) -> Self {
        let mut m = Self::none(n_candidates);
        for pos in 0..n_candidates {
            m.set(pos);
        }
        m
    }

    /// The candidates at `positions` (repeats allowed) of `n_candidates`.
    pub fn from_positions(
        n_candidates: usize,
        positions: impl IntoIterator<Item = usize>,
    ) -> Result<Self> {
        let mut m = Self::none(n_candidates);
        for pos in positions {
            m.insert(pos)?;
        }
        Ok(m)
    }

    /// Adds the candidate at `pos`; an error when `pos` is not below `n_candidates`.
    pub fn insert(&mut self, pos: usize) -> Result<()> {
        if pos >= self.n {
            return Err(RouterError::invalid(format!(
                "candidate position {pos} out of range for {} candidates",
                self.n
            )));
        }
        self.set(pos);
        Ok(())
    }

    /// `insert` for a position known to be in range.
    #[inline]
    pub(crate) fn set(&mut self, pos: usize) {
        debug_assert!(pos < self.n);
        if pos < WORD {
            self.low |= 1 << pos;
        } else {
            self.high[(pos - WORD) / WORD] |= 1 << (pos % WORD);
        }
    }

    /// Whether the candidate at `pos` is in the set (false out of range).
    #[inline]
    pub fn contains(&self, pos: usize) -> bool {
        if pos < WORD {
            self.low >> pos & 1 == 1
        } else {
            self.high
                .get((pos - WORD) / WORD)
                .is_some_and(|w| w >> (pos % WORD) & 1 == 1)
        }
    }

    /// How many candidates the decider it is for has.
    pub fn n_candidates(&self) -> usize {
        self.n
    }

    /// How many candidates are in the set.
    pub fn len(&self) -> usize {
        self.low.count_ones() as usize
            + self
                .high
                .iter()
                .map(|w| w.count_ones() as usize)
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.low == 0 && self.high.iter().all(|&w| w == 0)
    }

    /// Whether every candidate is in the set.
    pub fn is_all(&self) -> bool {
        self.len() == self.n
    }

    /// The positions in the set, ascending.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n).filter(|&p| self.contains(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_masks() {
        for n in [1, 5, 64, 65, 130] {
            let mut m = CandidateMask::none(n);
            assert!(m.is_empty() && m.positions().next().is_none() && !m.is_all());
            let picks: Vec<usize> = [0, n / 2, n - 1].into_iter().collect();
            for &p in &picks {
                m.insert(p).unwrap();
            }
            let mut want = picks.clone();
            want.dedup();
            assert_eq!(m.positions().collect::<Vec<_>>(), want, "n = {n}");
            assert_eq!(m.len(), want.len());
            assert!(!m.contains(n) && !m.contains(n + 64));
            assert!(m.insert(n).is_err());
            let all = CandidateMask::all(n);
            assert!(all.is_all() && all.len() == n);
            assert_eq!(CandidateMask::from_positions(n, 0..n).unwrap(), all);
        }
        assert!(CandidateMask::from_positions(3, [1, 3]).is_err());
        assert!(CandidateMask::none(0).is_all());
    }
}
