//! Choosing the cost-awareness threshold theta (paper G.2).
//!
//! Each query either has a threshold-free decision (no known tag, or a single candidate), or goes
//! to `M_SLM` when `Delta_q >= theta` and to `M_LLM` otherwise. So over a labelled set every
//! figure (accept rate, cost, share routed to `M_LLM`) is a step function of theta that changes
//! only at the queries' deltas. `sweep` is the curve of `curve.rs` (preference `-Delta_q` for
//! `M_LLM`) over the thresholded queries plus the threshold-free ones' fixed part, read at each
//! grid theta: sorting once evaluates any grid in O((n + g) log n).

use std::cmp::Ordering;

use crate::curve::Steps;
use crate::decide::{Reason, Route};
use crate::error::{Result, RouterError};

/// What routing a labelled set at one theta gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThetaPoint {
    pub theta: f64,
    /// Share of queries whose routed model's answer is acceptable (win or tie).
    pub accept_rate: f64,
    /// Mean cost per query of the routed models.
    pub mean_cost: f64,
    /// Share of queries routed to `M_LLM`.
    pub llm_share: f64,
}

/// A labelled query: its route at theta = 0 (which carries `Delta_q`, `M_SLM`, and the fixed
/// model when the threshold does not apply), whether each candidate is acceptable on it, and
/// what each candidate costs on it.
pub struct Labelled<'a> {
    pub routes: &'a [Route],
    /// `accept[q * n_models + m]`.
    pub accept: &'a [bool],
    /// `cost[q * n_models + m]`.
    pub cost: &'a [f64],
    pub n_models: usize,
    pub llm: usize,
}

impl Labelled<'_> {
    fn check(&self) -> Result<()> {
        let want = self.routes.len() * self.n_models;
        if self.accept.len() != want || self.cost.len() != want {
            return Err(RouterError::invalid(format!(
                "mismatched lengths: {} queries x {} models needs {want} labels and costs, got {} and {}",
                self.routes.len(),
                self.n_models,
                self.accept.len(),
                self.cost.len()
            )));
        }
        if let Some(c) = self.cost.iter().find(|c| !(c.is_finite() && **c >= 0.0)) {
            return Err(RouterError::invalid(format!(
                "costs must be finite and >= 0, got {c}"
            )));
        }
        if self.routes.is_empty() {
            return Err(RouterError::invalid("the labelled set is empty"));
        }
        Ok(())
    }
}

/// Rebuilds routes from decision columns (`RouteColumns`, `TagDecider.decide_batch`), e.g. the
/// out-of-fold decisions of several deciders put together, checking them on the way in.
///
/// `slm` is -1 exactly when `delta` is NaN (no known tag, or no small model). With `n_models`
/// given, every index must be a column below it (and `llm` too); without it only signs are
/// checked. The columns carry neither the reason nor `M*`, which no theta computation reads:
/// the routes say `Argmax` with `M*` = the routed model.
pub fn routes_from_columns(
    model: &[i64],
    delta: &[f64],
    slm: &[i64],
    llm: i64,
    n_models: Option<usize>,
) -> Result<Vec<Route>> {
    if model.len() != delta.len() || model.len() != slm.len() {
        return Err(RouterError::invalid(format!(
            "mismatched lengths: model has {}, delta {} and slm {} entries",
            model.len(),
            delta.len(),
            slm.len()
        )));
    }
    let bound = n_models.unwrap_or(usize::MAX);
    let index = |what: &str, q: Option<usize>, v: i64| -> Result<usize> {
        match usize::try_from(v) {
            Ok(i) if i < bound => Ok(i),
            _ => Err(bad_index(what, q, v, n_models)),
        }
    };
    let llm = index("llm", None, llm)?;
    let mut routes = Vec::with_capacity(model.len());
    for (q, ((&m, &d), &s)) in model.iter().zip(delta).zip(slm).enumerate() {
        let model = index("model", Some(q), m)?;
        let slm = if s == -1 {
            None
        } else {
            let s = index("slm", Some(q), s)?;
            if s == llm {
                return Err(RouterError::invalid(format!(
                    "slm[{q}] = {s} is llm: M_SLM is the best model other than M_LLM"
                )));
            }
            Some(s)
        };
        if slm.is_some() == d.is_nan() {
            return Err(RouterError::invalid(format!(
                "slm[{q}] = {s} but delta[{q}] = {d}: slm is -1 exactly when delta is NaN"
            )));
        }
        routes.push(Route {
            model,
            reason: Reason::Argmax,
            delta: d,
            argmax: model,
            slm,
        });
    }
    Ok(routes)
}

#[cold]
#[inline(never)]
fn bad_index(what: &str, q: Option<usize>, v: i64, n_models: Option<usize>) -> RouterError {
    let at = q.map_or_else(|| what.to_owned(), |q| format!("{what}[{q}]"));
    let min = if what == "slm" { "-1 or " } else { "" };
    RouterError::invalid(match n_models {
        Some(n) => format!("{at} = {v} is not {min}a model column in 0..{n}"),
        None => format!("{at} = {v} is not {min}a model column (>= 0)"),
    })
}

fn thresholded(r: &Route) -> Option<(f64, usize)> {
    match r.slm {
        Some(s) if !r.delta.is_nan() => Some((r.delta, s)),
        _ => None,
    }
}

/// Evaluates every theta of `grid` on the labelled set.
pub fn sweep(set: &Labelled<'_>, grid: &[f64]) -> Result<Vec<ThetaPoint>> {
    set.check()?;
    if grid.is_empty() {
        return Err(RouterError::invalid("the theta grid is empty"));
    }
    if let Some(t) = grid.iter().find(|t| !t.is_finite()) {
        return Err(RouterError::invalid(format!(
            "grid thetas must be finite, got {t}"
        )));
    }
    let nm = set.n_models;
    let n = set.routes.len();
    let at = |q: usize, m: usize| {
        (
            f64::from(u8::from(set.accept[q * nm + m])),
            set.cost[q * nm + m],
        )
    };
    // The threshold-free queries' fixed part, and the thresholded ones as a curve: preference
    // -delta for M_LLM, so `pref > -theta` is `delta < theta`, the queries theta keeps on M_LLM.
    let (mut fix_acc, mut fix_cost, mut fix_llm) = (0.0_f64, 0.0_f64, 0_usize);
    let mut moving: Vec<(usize, usize)> = Vec::new();
    let mut pref: Vec<f64> = Vec::new();
    for (q, r) in set.routes.iter().enumerate() {
        if let Some((delta, slm)) = thresholded(r) {
            moving.push((q, slm));
            pref.push(-delta);
        } else {
            let (a, c) = at(q, r.model);
            fix_acc += a;
            fix_cost += c;
            fix_llm += usize::from(r.model == set.llm);
        }
    }
    let steps = Steps::new(&pref, |i| {
        let (q, slm) = moving[i];
        let ((al, cl), (as_, cs)) = (at(q, set.llm), at(q, slm));
        (al - as_, cl - cs)
    });
    // Everything thresholded on M_SLM is the curve's start; each point adds its gains.
    let (mut base_acc, mut base_cost) = (fix_acc, fix_cost);
    for &(q, slm) in &moving {
        let (a, c) = at(q, slm);
        base_acc += a;
        base_cost += c;
    }
    let nf = n as f64;
    grid.iter()
        .map(|&theta| {
            // Queries with delta < theta stay on M_LLM; equal deltas fall on one side, so their
            // count is a group boundary of the curve.
            let p = steps.sorted.partition_point(|&pr| -pr < theta);
            let k = steps.point_at(p).ok_or_else(|| {
                RouterError::invalid(format!("theta {theta} splits a group of equal deltas"))
            })?;
            Ok(ThetaPoint {
                theta,
                accept_rate: (base_acc + steps.gain[k]) / nf,
                mean_cost: (base_cost + steps.dcost[k]) / nf,
                llm_share: (fix_llm + p) as f64 / nf,
            })
        })
        .collect()
}

/// The grid used when none is given: one theta per distinct outcome of the rule, placed between
/// consecutive distinct deltas (so that it generalises, rather than sitting on a training
/// delta), plus one below all (everything thresholded on `M_SLM`) and one above all (on `M_LLM`).
pub fn default_grid(routes: &[Route]) -> Vec<f64> {
    let mut d: Vec<f64> = routes
        .iter()
        .filter_map(|r| thresholded(r).map(|x| x.0))
        .collect();
    if d.is_empty() {
        return vec![0.0];
    }
    d.sort_by(f64::total_cmp);
    d.dedup();
    let mut grid = Vec::with_capacity(d.len() + 1);
    grid.push(d[0]);
    for w in d.windows(2) {
        grid.push(midpoint(w[0], w[1]));
    }
    grid.push(next_up(d[d.len() - 1]));
    grid
}

/// The best theta: highest accept rate, then lowest cost, then closest to 0 (the paper's
/// default), then the smaller theta.
pub fn best(points: &[ThetaPoint]) -> Option<ThetaPoint> {
    points.iter().copied().min_by(|a, b| {
        b.accept_rate
            .total_cmp(&a.accept_rate)
            .then(a.mean_cost.total_cmp(&b.mean_cost))
            .then(a.theta.abs().total_cmp(&b.theta.abs()))
            .then(a.theta.total_cmp(&b.theta))
    })
}

/// A theta that routes the largest share of queries to `M_LLM` not above `share`.
///
/// Queries with a threshold-free decision count with whatever they go to; when they alone exceed
/// `share`, the theta routing every other query to `M_SLM` is returned.
pub fn theta_for_llm_share(routes: &[Route], llm: usize, share: f64) -> Result<f64> {
    if !(0.0..=1.0).contains(&share) {
        return Err(RouterError::invalid(format!(
            "share must be in [0, 1], got {share}"
        )));
    }
    if routes.is_empty() {
        return Err(RouterError::invalid("no queries to calibrate theta on"));
    }
    let mut d: Vec<f64> = Vec::new();
    let mut fixed_llm = 0_usize;
    for r in routes {
        match thresholded(r) {
            Some((delta, _)) => d.push(delta),
            None => fixed_llm += usize::from(r.model == llm),
        }
    }
    if d.is_empty() {
        return Ok(0.0);
    }
    d.sort_by(f64::total_cmp);
    // Largest p (queries on M_LLM among the thresholded) with (fixed + p) / n <= share, then
    // lowered to a p that a threshold can realise (no cut between equal deltas).
    let n = routes.len() as f64;
    // share is in [0, 1], so the product is a non-negative count that fits; the epsilon keeps
    // 0.3 * 10 from flooring to 2.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let budget = (share * n + 1e-9 * n).floor() as usize;
    let mut p = budget.saturating_sub(fixed_llm).min(d.len());
    while p > 0 && p < d.len() && d[p - 1].total_cmp(&d[p]) == Ordering::Equal {
        p -= 1;
    }
    Ok(if p == 0 {
        d[0]
    } else if p == d.len() {
        next_up(d[p - 1])
    } else {
        midpoint(d[p - 1], d[p])
    })
}

fn midpoint(a: f64, b: f64) -> f64 {
    let m = a + (b - a) / 2.0;
    // With adjacent floats the midpoint rounds onto `a`; only `b` then separates them.
    if m > a {
        m
    } else {
        b
    }
}

/// The next float above `x` (`f64::next_up` is newer than this crate's MSRV).
fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let bits = x.to_bits();
    f64::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

#[cfg(test)]
// Exact float equality is what these tests check: same data, same operations, same bits.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::decide::Reason;

    fn route(delta: f64) -> Route {
        // Two candidates: 0 = M_LLM, 1 = M_SLM.
        let model = usize::from(delta >= 0.0);
        Route {
            model,
            reason: Reason::Argmax,
            delta,
            argmax: model,
            slm: Some(1),
        }
    }

    #[test]
    fn grid_search_by_hand() {
        // Deltas -2, -1, 1, 2; the grid is -2, -1.5, 0, 1.5 and just above 2.
        let routes = [route(-2.0), route(-1.0), route(1.0), route(2.0)];
        // accept[q][m]: LLM (m = 0) acceptable on q0 and q3, SLM (m = 1) on q0, q1, q2.
        let accept = [true, true, false, true, false, true, true, false];
        let cost = [10.0, 1.0, 10.0, 1.0, 10.0, 1.0, 10.0, 1.0];
        let set = Labelled {
            routes: &routes,
            accept: &accept,
            cost: &cost,
            n_models: 2,
            llm: 0,
        };
        let grid = default_grid(&routes);
        assert_eq!(grid.len(), 5);
        let pts = sweep(&set, &grid).unwrap();
        // theta = -2 (all SLM): q0, q1, q2 accepted -> 0.75.
        assert_eq!(pts[0].accept_rate, 0.75);
        assert_eq!(pts[0].llm_share, 0.0);
        // Above all (all LLM): q0, q3 -> 0.5.
        assert_eq!(pts[4].accept_rate, 0.5);
        assert_eq!(pts[4].mean_cost, 10.0);
        let b = best(&pts).unwrap();
        // All SLM and "q0 on LLM, rest SLM" both reach 0.75; all-SLM is cheaper.
        assert_eq!(b.theta, -2.0);
        assert_eq!(b.mean_cost, 1.0);
    }

    #[test]
    fn share_targets() {
        let routes = [route(-2.0), route(-1.0), route(1.0), route(1.0)];
        assert_eq!(theta_for_llm_share(&routes, 0, 0.0).unwrap(), -2.0);
        assert_eq!(theta_for_llm_share(&routes, 0, 0.5).unwrap(), 0.0);
        // 3 of 4 would split the tied deltas: back off to 2 of 4.
        assert_eq!(theta_for_llm_share(&routes, 0, 0.75).unwrap(), 0.0);
        assert!(theta_for_llm_share(&routes, 0, 1.0).unwrap() > 1.0);
        assert!(theta_for_llm_share(&routes, 0, 1.5).is_err());
    }
}
