//! Decisions among a subset of the candidates (capability routing: a request that needs tools,
//! vision or a long context goes only to the candidates that can serve it): the paper's rule
//! applied to the allowed candidates, on the same scores, without rebuilding the decider.
//!
//! For a non-empty allowed set `A` (a `CandidateMask` over `Decider::models()`):
//! - `M*` = argmax of `S` over `A` (ties as always: the cheaper, then the smaller name);
//! - `M_LLM(A)` = the decider's `M_LLM` if it is in `A`, else the most expensive candidate of
//!   `A` (ties: the smaller name, as `Decider::new` picks `M_LLM`);
//! - `M_SLM(A)` = argmax over `A` without `M_LLM(A)`; `Delta_q` against theta as usual;
//! - a single allowed candidate takes every query with a known tag (reason argmax, `Delta_q`
//!   NaN, no `M_SLM`, like a one-candidate decider);
//! - no known tag: the decider's fallback if it is in `A`, else `M_LLM(A)`. The fallback
//!   defaults to `M_LLM`, so this keeps that default's meaning (no evidence: the strongest
//!   allowed candidate) and needs no other rule; a cheap fallback that `A` excludes gives way
//!   to `M_LLM(A)` too, since without tags nothing says which other candidate would do.
//!
//! So a restricted decision is the decision of a decider built over `A` alone with
//! `llm = M_LLM(A)` and `fallback` as above; with every candidate allowed it is the
//! unrestricted decision, bit for bit (the same rule runs, `decide_rule`). An empty `A` is an
//! error (`RouterError::NoCandidate`): routing to a model that cannot serve the request is never
//! an answer.

use super::{decide_rule, Decided, Decider, Roles, Route, RouteColumns};
use crate::candidates::CandidateMask;
use crate::error::{Result, RouterError};

/// A candidate mask prepared for one decider (and its `with_theta`/`to_live` copies, which keep
/// its candidates): the allowed set in preference order and its roles. O(candidates) to make,
/// so a batch makes one per distinct set, not one per query.
#[derive(Debug, Clone)]
pub(crate) struct Restriction {
    /// Allowed candidates, by preference-order position.
    pref: CandidateMask,
    roles: Roles,
}

impl Restriction {
    #[inline]
    pub(crate) fn decide(&self, sums: &[f64], any_known: bool) -> Decided {
        let pref = &self.pref;
        decide_rule(sums, any_known, self.roles, |j| pref.contains(j))
    }

    /// `M_LLM(A)`, preference order.
    #[cfg_attr(not(feature = "python"), allow(dead_code))] // the glue's `Decision.llm`
    pub(crate) fn llm(&self) -> usize {
        self.roles.llm
    }
}

impl Decider {
    /// Position in `models()` of a candidate, by name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.positions.get(name).copied()
    }

    /// The mask of the named candidates (repeats allowed). An empty list gives an empty mask,
    /// which the `*_among` methods refuse.
    ///
    /// Errors: `UnknownModel` for a name that is not a candidate of this decider (a model of the
    /// store that is not a candidate included).
    pub fn candidate_mask<S: AsRef<str>>(&self, names: &[S]) -> Result<CandidateMask> {
        let mut mask = CandidateMask::none(self.n);
        for name in names {
            let name = name.as_ref();
            let pos = self
                .position(name)
                .ok_or_else(|| RouterError::unknown_model(name, &self.out_names))?;
            mask.set(pos);
        }
        Ok(mask)
    }

    /// Prepares `allowed` for decisions (module docs): its preference-order bits, `M_LLM(A)`
    /// and fallback.
    pub(crate) fn restriction(&self, allowed: &CandidateMask) -> Result<Restriction> {
        if allowed.n_candidates() != self.n {
            return Err(RouterError::invalid(format!(
                "candidate mask over {} candidates for a decider with {}",
                allowed.n_candidates(),
                self.n
            )));
        }
        let mut pref = CandidateMask::none(self.n);
        let mut count = 0_usize;
        let mut last = None;
        for (j, &out) in self.pref_to_out.iter().enumerate() {
            if allowed.contains(out) {
                pref.set(j);
                count += 1;
                last = Some(j);
            }
        }
        let Some(last) = last else {
            return Err(RouterError::no_candidate(
                "no candidate to route among: the allowed set is empty",
            ));
        };
        let llm = if pref.contains(self.llm) {
            self.llm
        } else {
            // Preference order is by cost, so the last allowed candidate has the top cost; the
            // first allowed one at that cost has the smallest name (`Decider::new`'s rule).
            let top = self.pref_costs[last];
            (0..=last)
                .find(|&j| pref.contains(j) && self.pref_costs[j].total_cmp(&top).is_eq())
                .unwrap_or(last)
        };
        let fallback = if pref.contains(self.fallback) {
            self.fallback
        } else {
            llm
        };
        Ok(Restriction {
            pref,
            roles: Roles {
                llm,
                fallback,
                single: count == 1,
                theta: self.theta,
            },
        })
    }

    /// `M_LLM` among `allowed`, in `models()` order (module docs).
    pub fn llm_among(&self, allowed: &CandidateMask) -> Result<usize> {
        Ok(self.pref_to_out[self.restriction(allowed)?.roles.llm])
    }

    /// The model for queries without a known tag among `allowed`, in `models()` order.
    pub fn fallback_among(&self, allowed: &CandidateMask) -> Result<usize> {
        Ok(self.pref_to_out[self.restriction(allowed)?.roles.fallback])
    }

    /// `route_ids` among the `allowed` candidates (module docs).
    ///
    /// Errors: `NoCandidate` for an empty mask, `InvalidArgument` for a mask over another
    /// number of candidates.
    pub fn route_ids_among(&self, ids: &[u32], allowed: &CandidateMask) -> Result<Route> {
        let r = self.restriction(allowed)?;
        Ok(self.with_view(|v| {
            self.with_sums(v, ids, |sums, any| self.to_out_route(r.decide(sums, any)))
        }))
    }

    /// `route` (tags, unknown ones ignored) among the `allowed` candidates.
    pub fn route_among<S: AsRef<str>>(&self, tags: &[S], allowed: &CandidateMask) -> Result<Route> {
        let r = self.restriction(allowed)?;
        Ok(self.with_view(|v| {
            let ids = super::known_ids(v, tags);
            self.with_sums(v, &ids, |sums, any| self.to_out_route(r.decide(sums, any)))
        }))
    }

    /// `explain_ids_with_rows` among the `allowed` candidates: the route, `S(M)` and each tag's
    /// scores for every candidate (`models()` order; those outside the mask were not eligible)
    /// from one state of a live store.
    pub fn explain_ids_with_rows_among(
        &self,
        ids: &[u32],
        allowed: &CandidateMask,
    ) -> Result<(Route, Vec<f64>, Vec<f64>)> {
        let r = self.restriction(allowed)?;
        Ok(self.explain_ids_with_rows_in(ids, Some(&r)))
    }

    /// One restriction per query from `allowed`: a single mask for the whole batch, or one
    /// mask per query.
    fn restrictions(
        &self,
        allowed: &[CandidateMask],
        n_queries: usize,
    ) -> Result<Vec<Restriction>> {
        if allowed.len() != 1 && allowed.len() != n_queries {
            return Err(RouterError::invalid(format!(
                "mismatched lengths: {} candidate masks for {n_queries} queries (expected 1 \
                 for the whole batch, or one per query)",
                allowed.len()
            )));
        }
        allowed.iter().map(|m| self.restriction(m)).collect()
    }

    /// `route_flat_pref` among the `allowed` candidates: `allowed` holds one mask for the whole
    /// batch or one per query. Every mask is checked before any query is routed.
    pub fn route_flat_pref_among<S: AsRef<str>>(
        &self,
        tags: &[S],
        offsets: &[usize],
        allowed: &[CandidateMask],
    ) -> Result<Vec<u32>> {
        let rs = self.restrictions(allowed, offsets.len().saturating_sub(1))?;
        let one = rs.len() == 1;
        Ok(self.route_flat_pref_with(tags, offsets, |q| Some(&rs[if one { 0 } else { q }])))
    }

    /// `route_columns_flat` among the `allowed` candidates (one mask, or one per query).
    pub fn route_columns_flat_among<S: AsRef<str>>(
        &self,
        tags: &[S],
        offsets: &[usize],
        allowed: &[CandidateMask],
    ) -> Result<RouteColumns> {
        let rs = self.restrictions(allowed, offsets.len().saturating_sub(1))?;
        let one = rs.len() == 1;
        Ok(self.route_columns_flat_with(tags, offsets, |q| Some(&rs[if one { 0 } else { q }])))
    }
}

#[cfg(test)]
// Exact float equality is the point: the same rule on the same sums gives the same bits.
#[allow(clippy::float_cmp)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::decide::{Aggregation, Reason};
    use crate::table::{Outcome, Params, Record, Store, Weighting};

    /// Deterministic xorshift: a fixed set of random cases, the same on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            usize::try_from(self.0 % n as u64).unwrap()
        }
    }

    const MODELS: [&str; 6] = ["m0", "m1", "m2", "m3", "m4", "m5"];
    const TAGS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    fn random_store(rng: &mut Rng, weighting: Weighting) -> Arc<Store> {
        let outcomes = [Outcome::Win, Outcome::Tie, Outcome::Loss];
        let queries: Vec<(String, Vec<&str>)> = (0..8)
            .map(|q| {
                let tags = (0..=rng.below(3)).map(|_| TAGS[rng.below(TAGS.len())]);
                (format!("q{q}"), tags.collect())
            })
            .collect();
        let mut recs = Vec::new();
        for (q, tags) in &queries {
            for m in MODELS {
                if rng.below(4) > 0 {
                    recs.push(Record {
                        query_id: q,
                        tags,
                        model: m,
                        outcome: outcomes[rng.below(3)],
                    });
                }
            }
        }
        // Every model at least once, so every one can be a candidate.
        for m in MODELS {
            recs.push(Record {
                query_id: &queries[0].0,
                tags: &queries[0].1,
                model: m,
                outcome: Outcome::Tie,
            });
        }
        let params = Params {
            weighting,
            prior_strength: 1.0,
            ..Params::default()
        };
        Arc::new(Store::from_records(params, recs).unwrap())
    }

    /// A random decider: a few candidates with costs from a small set (ties in cost happen),
    /// sometimes an explicit M_LLM or fallback, a random theta and aggregation.
    fn random_decider(rng: &mut Rng) -> Decider {
        let weighting = [Weighting::Paper, Weighting::None, Weighting::Shrunk][rng.below(3)];
        let store = random_store(rng, weighting);
        let n = 1 + rng.below(MODELS.len());
        let costs: Vec<(String, f64)> = MODELS[..n]
            .iter()
            .map(|m| ((*m).to_owned(), [0.0, 1.0, 2.0, 10.0][rng.below(4)]))
            .collect();
        let pick = |rng: &mut Rng| (rng.below(2) == 0).then(|| MODELS[rng.below(n)]);
        let (llm, fallback) = (pick(rng), pick(rng));
        let theta = [0.0, -0.3, 0.2, 1.0][rng.below(4)];
        let agg = [Aggregation::Sum, Aggregation::Mean][rng.below(2)];
        Decider::new(store, &costs, llm, theta, fallback)
            .unwrap()
            .with_aggregation(agg)
    }

    fn random_query(rng: &mut Rng, d: &Decider) -> Vec<u32> {
        let names = ["a", "b", "c", "d", "e", "f", "a", "b"];
        (0..rng.below(5))
            .filter_map(|_| d.tag_id(names[rng.below(names.len())]))
            .collect()
    }

    fn same(a: &Route, b: &Route) -> bool {
        a.model == b.model
            && a.reason == b.reason
            && a.argmax == b.argmax
            && a.slm == b.slm
            && a.delta.to_bits() == b.delta.to_bits()
    }

    #[test]
    fn every_candidate_allowed_is_the_unrestricted_decision() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for _ in 0..300 {
            let d = random_decider(&mut rng);
            let d = if rng.below(2) == 0 { d } else { d.to_live() };
            let all = CandidateMask::all(d.n_models());
            assert_eq!(d.llm_among(&all).unwrap(), d.llm());
            assert_eq!(d.fallback_among(&all).unwrap(), d.fallback());
            for _ in 0..5 {
                let ids = random_query(&mut rng, &d);
                assert!(same(
                    &d.route_ids_among(&ids, &all).unwrap(),
                    &d.route_ids(&ids)
                ));
                let (r, s, rows) = d.explain_ids_with_rows_among(&ids, &all).unwrap();
                let (r0, s0, rows0) = d.explain_ids_with_rows(&ids);
                assert!(same(&r, &r0));
                assert_eq!((s, rows), (s0, rows0));
            }
        }
    }

    #[test]
    fn a_subset_decides_like_a_decider_built_over_it() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut restricted_llm = 0;
        for _ in 0..300 {
            let d = random_decider(&mut rng);
            let n = d.n_models();
            let mask =
                CandidateMask::from_positions(n, (0..=rng.below(n)).map(|_| rng.below(n))).unwrap();
            let names: Vec<&str> = mask.positions().map(|p| d.models()[p].as_str()).collect();
            assert_eq!(d.candidate_mask(&names).unwrap(), mask);
            let (llm, fallback) = (
                d.llm_among(&mask).unwrap(),
                d.fallback_among(&mask).unwrap(),
            );
            assert!(mask.contains(llm) && mask.contains(fallback));
            if !mask.contains(d.llm()) {
                restricted_llm += 1;
                // The most expensive allowed candidate, ties to the smaller name.
                let top = mask.positions().map(|p| d.cost(p)).fold(f64::MIN, f64::max);
                let want = mask
                    .positions()
                    .filter(|&p| d.cost(p) == top)
                    .min_by_key(|&p| d.models()[p].clone())
                    .unwrap();
                assert_eq!(llm, want);
            }
            let want_fallback = if mask.contains(d.fallback()) {
                d.fallback()
            } else {
                llm
            };
            assert_eq!(fallback, want_fallback);
            // The same rule on a decider over the subset alone, with those roles.
            let costs: Vec<(String, f64)> = mask
                .positions()
                .map(|p| (d.models()[p].clone(), d.cost(p)))
                .collect();
            let sub = Decider::new(
                d.store(),
                &costs,
                Some(d.models()[llm].as_str()),
                d.theta(),
                Some(d.models()[fallback].as_str()),
            )
            .unwrap()
            .with_aggregation(d.aggregation());
            let name = |dd: &Decider, i: usize| dd.models()[i].clone();
            for _ in 0..5 {
                let ids = random_query(&mut rng, &d);
                let r = d.route_ids_among(&ids, &mask).unwrap();
                let w = sub.route_ids(&ids);
                assert_eq!(name(&d, r.model), name(&sub, w.model));
                assert_eq!(name(&d, r.argmax), name(&sub, w.argmax));
                assert_eq!(r.slm.map(|i| name(&d, i)), w.slm.map(|i| name(&sub, i)));
                assert_eq!((r.reason, r.delta.to_bits()), (w.reason, w.delta.to_bits()));
                assert!(mask.contains(r.model));
                let (_, sums, _) = d.explain_ids_with_rows_among(&ids, &mask).unwrap();
                let (_, sub_sums) = sub.explain_ids(&ids);
                let kept: Vec<f64> = mask.positions().map(|p| sums[p]).collect();
                assert_eq!(kept, sub_sums);
            }
        }
        assert!(
            restricted_llm > 20,
            "too few cases exclude M_LLM: {restricted_llm}"
        );
    }

    fn two_by_two() -> Decider {
        let r = |q, tags, m, o| Record {
            query_id: q,
            tags,
            model: m,
            outcome: o,
        };
        let mut recs = Vec::new();
        for (m, poem, math) in [
            ("big", Outcome::Win, Outcome::Win),
            ("big2", Outcome::Win, Outcome::Loss),
            ("mid", Outcome::Tie, Outcome::Win),
            ("small", Outcome::Loss, Outcome::Win),
        ] {
            recs.push(r("q1", &["poem"][..], m, poem));
            recs.push(r("q2", &["math"][..], m, math));
        }
        let store = Arc::new(Store::from_records(Params::default(), recs).unwrap());
        let costs = [("big", 10.0), ("big2", 10.0), ("mid", 3.0), ("small", 1.0)]
            .map(|(m, c)| (m.to_owned(), c));
        Decider::new(store, &costs, Some("big2"), 0.0, Some("small")).unwrap()
    }

    #[test]
    fn edge_cases() {
        let d = two_by_two();
        let pos = |m: &str| d.position(m).unwrap();
        // Empty mask: an error, never a model that cannot serve.
        let none = CandidateMask::none(4);
        let err = d.route_ids_among(&[], &none).unwrap_err();
        assert!(matches!(err, RouterError::NoCandidate(_)), "{err}");
        assert!(d.candidate_mask::<&str>(&[]).unwrap().is_empty());
        // A mask for another decider.
        let err = d.route_ids_among(&[], &CandidateMask::all(3)).unwrap_err();
        assert!(matches!(err, RouterError::InvalidArgument(_)), "{err}");
        // Names that are not candidates.
        let err = d.candidate_mask(&["big", "huge"]).unwrap_err();
        assert!(matches!(err, RouterError::UnknownModel { .. }));
        assert!(err.to_string().contains("'huge'"), "{err}");
        // M_LLM (big2) excluded: the most expensive allowed, ties to the smaller name (big);
        // the fallback (small) excluded: M_LLM(A).
        let m = d.candidate_mask(&["mid", "big"]).unwrap();
        assert_eq!(d.llm_among(&m).unwrap(), pos("big"));
        assert_eq!(d.fallback_among(&m).unwrap(), pos("big"));
        let fb = d.route_among::<&str>(&[], &m).unwrap();
        assert_eq!(
            (fb.model, fb.reason, fb.slm),
            (pos("big"), Reason::Fallback, None)
        );
        // Allowed fallback stays the fallback.
        let m2 = d.candidate_mask(&["mid", "small"]).unwrap();
        assert_eq!(
            d.route_among::<&str>(&["nope"], &m2).unwrap().model,
            pos("small")
        );
        assert_eq!(d.llm_among(&m2).unwrap(), pos("mid"));
        // One candidate: it takes the query whatever the scores.
        let one = d.candidate_mask(&["small", "small"]).unwrap();
        let r = d.route_among(&["poem"], &one).unwrap();
        assert_eq!(
            (r.model, r.reason, r.slm),
            (pos("small"), Reason::Argmax, None)
        );
        assert!(r.delta.is_nan());
        // Poem: big and big2 tie on top; without them mid beats small.
        assert_eq!(d.route(&["poem"]).model, pos("big"));
        let r = d.route_among(&["poem"], &m2).unwrap();
        assert_eq!(
            (r.model, r.argmax, r.slm),
            (pos("mid"), pos("mid"), Some(pos("small")))
        );
    }

    #[test]
    fn batches_take_one_mask_or_one_per_query() {
        let d = two_by_two().with_theta(-0.1).unwrap();
        let tags = ["poem", "math", "poem", "nope", "math"];
        let offsets = [0, 1, 2, 4, 5];
        let masks = [
            d.candidate_mask(&["mid", "small"]).unwrap(),
            d.candidate_mask(&["big2"]).unwrap(),
            d.candidate_mask(&["big", "mid"]).unwrap(),
            CandidateMask::all(4),
        ];
        let queries: Vec<&[&str]> = offsets.windows(2).map(|w| &tags[w[0]..w[1]]).collect();
        for live in [false, true] {
            let d = if live { d.to_live() } else { d.clone() };
            let cols = d.route_columns_flat_among(&tags, &offsets, &masks).unwrap();
            let pref = d.route_flat_pref_among(&tags, &offsets, &masks).unwrap();
            for (q, m) in masks.iter().enumerate() {
                let r = d.route_among(queries[q], m).unwrap();
                assert_eq!(cols.model[q], i64::try_from(r.model).unwrap());
                assert_eq!(cols.delta[q].to_bits(), r.delta.to_bits());
                assert_eq!(d.to_out(pref[q] as usize), r.model);
            }
            let one = d
                .route_columns_flat_among(&tags, &offsets, &masks[..1])
                .unwrap();
            for (q, query) in queries.iter().enumerate() {
                let r = d.route_among(query, &masks[0]).unwrap();
                assert_eq!(one.model[q], i64::try_from(r.model).unwrap());
            }
            let all = d
                .route_columns_flat_among(&tags, &offsets, &masks[3..])
                .unwrap();
            assert_eq!(all, d.route_columns_flat(&tags, &offsets));
            assert!(d
                .route_columns_flat_among(&tags, &offsets, &masks[..2])
                .is_err());
            let mut empty = masks.to_vec();
            empty[2] = CandidateMask::none(4);
            assert!(matches!(
                d.route_flat_pref_among(&tags, &offsets, &empty),
                Err(RouterError::NoCandidate(_))
            ));
        }
    }

    #[test]
    fn live_deciders_decide_among_their_current_counts() {
        let d = two_by_two().to_live();
        let m = d.candidate_mask(&["mid", "small"]).unwrap();
        let before = d.route_among(&["poem"], &m).unwrap();
        assert_eq!(d.models()[before.model], "mid");
        for _ in 0..3 {
            d.live()
                .unwrap()
                .learn(&["poem"], "small", Outcome::Win)
                .unwrap();
        }
        assert_eq!(
            d.models()[d.route_among(&["poem"], &m).unwrap().model],
            "small"
        );
    }
}
