//! Criterion benches of the pure core (no Python). FFI overhead = pytest-benchmark figure minus
//! the matching figure here.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tagrouter_core::table::{Outcome, Params, Record, Store};
use tagrouter_core::{store_io, Aggregation, CandidateMask, Decider};

/// Deterministic xorshift, so that runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }
}

struct Data {
    tags: Vec<String>,
    models: Vec<String>,
    /// (query id, tag indices, model index, outcome)
    records: Vec<(String, Vec<usize>, usize, Outcome)>,
}

fn data(n_tags: usize, n_models: usize, n_queries: usize, tags_per_query: usize) -> Data {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let tags: Vec<String> = (0..n_tags).map(|i| format!("Tag number {i}")).collect();
    let models: Vec<String> = (0..n_models).map(|i| format!("model-{i}")).collect();
    let outcomes = [Outcome::Win, Outcome::Tie, Outcome::Loss];
    let mut records = Vec::new();
    for q in 0..n_queries {
        let qt: Vec<usize> = (0..tags_per_query).map(|_| rng.below(n_tags)).collect();
        for m in 0..n_models {
            records.push((format!("q{q}"), qt.clone(), m, outcomes[rng.below(3)]));
        }
    }
    Data {
        tags,
        models,
        records,
    }
}

fn build(d: &Data, limit: usize) -> Store {
    let tag_strs: Vec<Vec<&str>> = d
        .records
        .iter()
        .take(limit)
        .map(|r| r.1.iter().map(|&t| d.tags[t].as_str()).collect())
        .collect();
    Store::from_records(
        Params::default(),
        d.records.iter().zip(&tag_strs).map(|(r, t)| Record {
            query_id: &r.0,
            tags: t,
            model: &d.models[r.2],
            outcome: r.3,
        }),
    )
    .expect("valid records")
}

fn decider(store: Store, models: &[String]) -> Decider {
    #[allow(clippy::cast_precision_loss)]
    let costs: Vec<(String, f64)> = models
        .iter()
        .enumerate()
        .map(|(i, m)| (m.clone(), 1.0 + i as f64))
        .collect();
    Decider::new(Arc::new(store), &costs, None, 0.0, None).expect("valid decider")
}

fn routing(c: &mut Criterion) {
    // The scenario: 5 tags per query, 5 models, a 2,000-tag store.
    let d = data(2000, 5, 4000, 4);
    let dec = decider(build(&d, usize::MAX), &d.models);
    let mut rng = Rng(42);
    let queries: Vec<Vec<&str>> = (0..100_000)
        .map(|_| (0..5).map(|_| d.tags[rng.below(2000)].as_str()).collect())
        .collect();
    let one = &queries[0];
    c.bench_function("route 5 tags x 5 models", |b| {
        b.iter(|| dec.route(black_box(one)));
    });
    // What the mean adds on top: one division per model.
    let mean = dec.clone().with_aggregation(Aggregation::Mean);
    c.bench_function("route 5 tags x 5 models (mean)", |b| {
        b.iter(|| mean.route(black_box(one)));
    });
    c.bench_function("explain 5 tags x 5 models", |b| {
        b.iter(|| dec.explain(black_box(one)));
    });
    // Capability routing: 3 of the 5 candidates, M_LLM (the most expensive) excluded so that
    // the subset's roles are worked out; the mask is prepared per call, as a request's is.
    let among = dec
        .candidate_mask(&["model-0", "model-1", "model-3"])
        .expect("candidates");
    c.bench_function("route 5 tags x 5 models, among 3", |b| {
        b.iter(|| dec.route_among(black_box(one), black_box(&among)));
    });
    let all = CandidateMask::all(dec.n_models());
    c.bench_function("route 5 tags x 5 models, among all 5", |b| {
        b.iter(|| dec.route_among(black_box(one), black_box(&all)));
    });
    let flat: Vec<&str> = queries.iter().flatten().copied().collect();
    let offsets: Vec<usize> = (0..=queries.len()).map(|i| i * 5).collect();
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Elements(queries.len() as u64));
    g.sample_size(20);
    g.bench_function("route_flat 100k queries", |b| {
        b.iter(|| dec.route_flat_pref(black_box(&flat), &offsets));
    });
    g.bench_function("route_flat 100k queries, among 3", |b| {
        b.iter(|| {
            dec.route_flat_pref_among(black_box(&flat), &offsets, std::slice::from_ref(&among))
        });
    });
    g.finish();
}

fn building(c: &mut Criterion) {
    let d = data(2000, 5, 20_000, 4);
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.bench_function("build from 100k records", |b| b.iter(|| build(&d, 100_000)));
    // 10,000 tags x 50 models.
    let big = data(10_000, 50, 4000, 5);
    let bytes = store_io::to_bytes(&build(&big, usize::MAX));
    g.bench_function("load 10k tags x 50 models (from bytes)", |b| {
        b.iter_batched(
            || bytes.clone(),
            |b| store_io::from_bytes(&b),
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

criterion_group!(benches, routing, building);
criterion_main!(benches);
