//! The AR / cost curve of a threshold sweep: the one sweep behind the evaluation harness's
//! curves (`eval.metrics.sweep`) and the theta grid search (`theta::sweep`).
//!
//! Every router is reduced to a per-query preference for `M_LLM` over its small model; a query
//! goes to `M_LLM` iff `pref > t`. Sweeping `t` from `+inf` (all small) to `-inf` (all `M_LLM`)
//! moves the queries over in order of preference, and queries with equal preference move
//! together (no threshold separates them). So sorting once and keeping running sums gives every
//! point of the curve: one per group of equal preference, plus the all-small start.

use std::cmp::Ordering;

use crate::error::{Result, RouterError};

/// Points of a threshold sweep, from all-small (ratio 0) to all-`M_LLM` (ratio 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Share of queries routed to `M_LLM` at each point (non-decreasing, 0 to 1).
    pub ratio: Vec<f64>,
    /// Accept rate at each point.
    pub ar: Vec<f64>,
    /// Mean cost per query at each point.
    pub cost: Vec<f64>,
    /// A threshold realising each point, `pref > t` routing exactly its queries to `M_LLM`:
    /// `+inf` for all-small, then the midpoint between the last preference routed and the next
    /// (so it transfers to unseen queries without favouring either), `-inf` for all-`M_LLM`.
    pub thresholds: Vec<f64>,
}

/// What sweeping a set's preferences gives before it is turned into rates: the queries sorted by
/// preference (highest first), cut into groups of equal preference, and running sums of what
/// moving them to `M_LLM` changes. Point `k` has the first `k` groups on `M_LLM`.
pub(crate) struct Steps {
    /// Preferences, highest first; equal ones keep their input order.
    pub sorted: Vec<f64>,
    /// `routed[k]`: queries on `M_LLM` at point `k` (0, then each group's end).
    pub routed: Vec<usize>,
    /// `gain[k]`: sum of `acc_llm - acc_slm` over the queries on `M_LLM` at point `k`.
    pub gain: Vec<f64>,
    /// `dcost[k]`: sum of `cost_llm - cost_slm` over the same queries.
    pub dcost: Vec<f64>,
}

impl Steps {
    /// Sorts `pref` (no NaN) and sums, in that order, each query's `(acc_llm - acc_slm,
    /// cost_llm - cost_slm)` as `delta(q)` gives them.
    pub fn new(pref: &[f64], delta: impl Fn(usize) -> (f64, f64)) -> Self {
        let mut order: Vec<usize> = (0..pref.len()).collect();
        // Stable, and -0.0 == 0.0: equal preferences are one group, in input order.
        order.sort_by(|&a, &b| pref[b].partial_cmp(&pref[a]).unwrap_or(Ordering::Equal));
        let sorted: Vec<f64> = order.iter().map(|&q| pref[q]).collect();
        let mut routed = vec![0];
        let (mut gain, mut dcost) = (vec![0.0], vec![0.0]);
        let (mut g, mut c) = (0.0_f64, 0.0_f64);
        for (i, &q) in order.iter().enumerate() {
            let (dg, dc) = delta(q);
            g += dg;
            c += dc;
            // Exact equality on purpose: only an identical preference is inseparable.
            #[allow(clippy::float_cmp)]
            let ends = i + 1 == sorted.len() || sorted[i + 1] != sorted[i];
            if ends {
                routed.push(i + 1);
                gain.push(g);
                dcost.push(c);
            }
        }
        Self {
            sorted,
            routed,
            gain,
            dcost,
        }
    }

    /// The point whose `M_LLM` queries are exactly the first `p` sorted ones. `p` must fall on
    /// a group boundary, as it does when it counts the queries on one side of a threshold.
    pub fn point_at(&self, p: usize) -> Option<usize> {
        self.routed.binary_search(&p).ok()
    }
}

/// Traces the AR / cost curve of a router's threshold sweep.
///
/// `pref[q]` is the preference for `M_LLM` (higher goes first; `+inf` and `-inf` allowed, NaN
/// not); `acc_*` whether (or how much) each side's answer is accepted; `cost_*` each side's cost
/// per query. `-inf` is clamped to `-1e300` so that "all to `M_LLM`" stays reachable by a
/// threshold. The base means use pairwise summation (as numpy does), so the curve agrees with
/// the numpy reference (`_reference.sweep`) to the last bit.
// The names are the Python API's (`eval.metrics.sweep`): llm vs slm is the whole point.
#[allow(clippy::similar_names)]
pub fn sweep(
    pref: &[f64],
    acc_llm: &[f64],
    acc_slm: &[f64],
    cost_llm: &[f64],
    cost_slm: &[f64],
) -> Result<Curve> {
    let n = pref.len();
    if n == 0 {
        return Err(RouterError::invalid("empty test set"));
    }
    for (what, v) in [
        ("acc_llm", acc_llm),
        ("acc_slm", acc_slm),
        ("cost_llm", cost_llm),
        ("cost_slm", cost_slm),
    ] {
        if v.len() != n {
            return Err(RouterError::invalid(format!(
                "mismatched lengths: pref has {n} entries but {what} has {}",
                v.len()
            )));
        }
    }
    if let Some(q) = pref.iter().position(|p| p.is_nan()) {
        return Err(RouterError::invalid(format!(
            "pref[{q}] is NaN; a preference must be a number (+-inf allowed)"
        )));
    }
    let pref: Vec<f64> = pref.iter().map(|&p| p.max(-1e300)).collect();
    let steps = Steps::new(&pref, |q| {
        (acc_llm[q] - acc_slm[q], cost_llm[q] - cost_slm[q])
    });
    let nf = n as f64;
    let (base_acc, base_cost) = (pairwise_sum(acc_slm) / nf, pairwise_sum(cost_slm) / nf);
    let s = &steps.sorted;
    let mut thresholds = Vec::with_capacity(steps.routed.len());
    thresholds.push(f64::INFINITY);
    for &end in &steps.routed[1..] {
        let cur = s[end - 1];
        let next = s.get(end).copied().unwrap_or(f64::NEG_INFINITY);
        thresholds.push(if end == n {
            f64::NEG_INFINITY
        } else {
            // The midpoint, unless it does not separate the two: rounded onto `cur` (adjacent
            // floats) or overflowed (`cur` = +inf or near f64::MAX); `next` then does.
            let mid = (cur + next) / 2.0;
            if mid < cur {
                mid
            } else {
                next
            }
        });
    }
    Ok(Curve {
        ratio: steps.routed.iter().map(|&r| r as f64 / nf).collect(),
        ar: steps.gain.iter().map(|g| base_acc + g / nf).collect(),
        cost: steps.dcost.iter().map(|c| base_cost + c / nf).collect(),
        thresholds,
    })
}

/// Pairwise summation with numpy's blocking (8 accumulators over blocks of at most 128, halves
/// above that): rounding error O(log n) instead of O(n), and the same bits as `np.sum`.
pub(crate) fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |s, x| s + x)
    } else if n <= BLOCK {
        let mut r = [0.0_f64; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        for chunk in a[8..full].chunks_exact(8) {
            for (acc, x) in r.iter_mut().zip(chunk) {
                *acc += x;
            }
        }
        let head = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        a[full..].iter().fold(head, |s, x| s + x)
    } else {
        let half = n / 2;
        let half = half - half % 8;
        pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
    }
}

/// AUC and PAUC of one router's curve under many weightings of its queries (the paired
/// bootstrap's resamples), without building each resampled curve: the queries are sorted and
/// grouped once (as `sweep` does), then each weighting is one pass of running sums.
///
/// `weights` is `n_weightings x n` row-major (e.g. multinomial counts), `ar_llm[b]` always-`M_LLM`'s
/// accept rate under weighting `b`. AUC is the trapezoid area of AR over the share of weight
/// routed to `M_LLM`; PAUC the exact area of the part above `ar_llm[b]`.
///
/// # Errors
/// Mismatched lengths, a NaN preference, or a weighting whose weights sum to zero or less.
#[allow(clippy::similar_names)]
pub fn weighted_areas(
    pref: &[f64],
    acc_llm: &[f64],
    acc_slm: &[f64],
    weights: &[f64],
    ar_llm: &[f64],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = pref.len();
    if acc_llm.len() != n || acc_slm.len() != n {
        return Err(RouterError::invalid(format!(
            "mismatched lengths: pref has {n} entries, acc_llm {}, acc_slm {}",
            acc_llm.len(),
            acc_slm.len()
        )));
    }
    let nb = ar_llm.len();
    if weights.len() != nb * n {
        return Err(RouterError::invalid(format!(
            "weights must be {nb} x {n} (one row per ar_llm entry), got {} values",
            weights.len()
        )));
    }
    if let Some(q) = pref.iter().position(|p| p.is_nan()) {
        return Err(RouterError::invalid(format!(
            "pref[{q}] is NaN; a preference must be a number (+-inf allowed)"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| pref[b].partial_cmp(&pref[a]).unwrap_or(Ordering::Equal));
    // Group ends (exclusive positions in `order`) of equal preferences.
    #[allow(clippy::float_cmp)]
    let ends: Vec<usize> = (0..n)
        .filter(|&i| i + 1 == n || pref[order[i + 1]] != pref[order[i]])
        .map(|i| i + 1)
        .collect();
    let mut aucs = Vec::with_capacity(nb);
    let mut paucs = Vec::with_capacity(nb);
    for (b, &ar_ref) in ar_llm.iter().enumerate() {
        let w = &weights[b * n..(b + 1) * n];
        let tot: f64 = w.iter().sum();
        // NaN sums are refused too.
        if tot.is_nan() || tot <= 0.0 {
            return Err(RouterError::invalid(format!(
                "weighting {b} sums to {tot}; weights must be >= 0 with a positive sum"
            )));
        }
        let base = w.iter().zip(acc_slm).map(|(wi, a)| wi * a).sum::<f64>() / tot;
        let (mut cw, mut cg) = (0.0_f64, 0.0_f64);
        let (mut x0, mut y0) = (0.0_f64, base);
        let (mut area, mut parea) = (0.0_f64, 0.0_f64);
        let mut k = 0;
        for (i, &q) in order.iter().enumerate() {
            cw += w[q];
            cg += w[q] * (acc_llm[q] - acc_slm[q]);
            if ends[k] == i + 1 {
                k += 1;
                let (x1, y1) = (cw / tot, base + cg / tot);
                let dx = x1 - x0;
                area += dx * (y1 + y0) / 2.0;
                parea += positive_area(dx, y0 - ar_ref, y1 - ar_ref);
                (x0, y0) = (x1, y1);
            }
        }
        aucs.push(area);
        paucs.push(parea);
    }
    Ok((aucs, paucs))
}

/// Exact area of `max(y, 0)` over a segment of width `dx` where `y` is linear from `y0` to `y1`.
fn positive_area(dx: f64, y0: f64, y1: f64) -> f64 {
    if y0 >= 0.0 && y1 >= 0.0 {
        dx * (y0 + y1) / 2.0
    } else if (y0 > 0.0) != (y1 > 0.0) {
        let (pos, span) = (y0.max(y1), y0.abs() + y1.abs());
        if span > 0.0 {
            dx * pos * pos / (2.0 * span)
        } else {
            0.0
        }
    } else {
        0.0
    }
}

#[cfg(test)]
// Exact float equality is what these tests check: same data, same operations, same bits.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_preference_and_groups_ties() {
        let pref = [3.0, 1.0, 1.0, -2.0];
        let c = sweep(
            &pref,
            &[1.0, 0.0, 1.0, 0.0],
            &[0.0, 0.0, 0.0, 1.0],
            &[10.0; 4],
            &[1.0; 4],
        )
        .unwrap();
        // Groups {0}, {1, 2}, {3}: four points, all-small to all-M_LLM.
        assert_eq!(c.ratio, [0.0, 0.25, 0.75, 1.0]);
        assert_eq!(c.ar, [0.25, 0.5, 0.75, 0.5]);
        assert_eq!(c.cost, [1.0, 3.25, 7.75, 10.0]);
        assert_eq!(c.thresholds, [f64::INFINITY, 2.0, -0.5, f64::NEG_INFINITY]);
        // Each threshold routes exactly its point's queries.
        for (t, r) in c.thresholds.iter().zip(&c.ratio) {
            let on = pref.iter().filter(|p| *p > t).count();
            assert_eq!(on as f64 / 4.0, *r);
        }
    }

    #[test]
    fn infinities_and_signed_zero() {
        // +inf first; -inf clamped so that the last threshold (-inf) still routes it; -0.0 and
        // 0.0 are one group.
        let pref = [f64::NEG_INFINITY, 0.0, f64::INFINITY, -0.0];
        let z = [0.0; 4];
        let c = sweep(&pref, &[1.0, 1.0, 1.0, 1.0], &z, &z, &z).unwrap();
        assert_eq!(c.ratio, [0.0, 0.25, 0.75, 1.0]);
        assert_eq!(c.ar, [0.0, 0.25, 0.75, 1.0]);
        assert_eq!(
            c.thresholds,
            [f64::INFINITY, 0.0, -5e299, f64::NEG_INFINITY]
        );
    }

    #[test]
    fn constant_preference_is_one_step() {
        let c = sweep(
            &[0.5; 3],
            &[1.0, 0.0, 0.0],
            &[0.0, 1.0, 1.0],
            &[0.0; 3],
            &[0.0; 3],
        )
        .unwrap();
        assert_eq!(c.ratio, [0.0, 1.0]);
        assert_eq!(c.thresholds, [f64::INFINITY, f64::NEG_INFINITY]);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(sweep(&[], &[], &[], &[], &[]).is_err());
        assert!(sweep(&[1.0], &[1.0, 0.0], &[0.0], &[0.0], &[0.0]).is_err());
        let e = sweep(&[f64::NAN], &[1.0], &[0.0], &[0.0], &[0.0]).unwrap_err();
        assert!(e.to_string().contains("pref[0] is NaN"));
    }

    #[test]
    fn thresholds_separate_adjacent_floats() {
        let tiny = -f64::from_bits(1); // the float just below -0.0
        let big = f64::MAX;
        for pref in [[-0.0, tiny], [big, big / 2.0]] {
            let c = sweep(&pref, &[0.0; 2], &[0.0; 2], &[0.0; 2], &[0.0; 2]).unwrap();
            assert_eq!(c.thresholds[1], pref[1]);
            assert_eq!(pref.iter().filter(|p| **p > c.thresholds[1]).count(), 1);
        }
    }

    #[test]
    fn weighted_areas_with_unit_weights_match_the_curve() {
        let pref = [2.0, 1.0, 1.0, -0.5];
        let (al, asl) = ([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]);
        let zeros = [0.0; 4];
        let c = sweep(&pref, &al, &asl, &zeros, &zeros).unwrap();
        let want: f64 = c
            .ratio
            .windows(2)
            .zip(c.ar.windows(2))
            .map(|(r, a)| (r[1] - r[0]) * (a[1] + a[0]) / 2.0)
            .sum();
        let (auc, pauc) = weighted_areas(&pref, &al, &asl, &[1.0; 4], &[0.5]).unwrap();
        assert!((auc[0] - want).abs() < 1e-15);
        assert!(pauc[0] > 0.0);
        // Doubling every weight changes nothing; a zero weighting is an error.
        let (auc2, _) = weighted_areas(&pref, &al, &asl, &[2.0; 4], &[0.5]).unwrap();
        assert!((auc2[0] - auc[0]).abs() < 1e-15);
        assert!(weighted_areas(&pref, &al, &asl, &[0.0; 4], &[0.5]).is_err());
    }

    #[test]
    fn pairwise_sum_is_a_sum() {
        for n in [0, 1, 7, 8, 9, 127, 128, 129, 300, 1000] {
            let v: Vec<f64> = (0..n).map(|i| f64::from(i % 7)).collect();
            // Small integers: every order of summation is exact.
            assert_eq!(pairwise_sum(&v), v.iter().sum::<f64>());
        }
    }
}
