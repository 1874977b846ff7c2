//! Statement classification benchmarks (criterion): three typical statements (a point read with
//! placeholders, an insert, a CTE with a join and window function), classified from scratch and
//! through the shared `ClassCache`. Run: cargo bench --bench classify

use std::hint::black_box;

use cellgate::sqlclass::{ClassCache, Dialect, Policy, classify};
use criterion::{Criterion, criterion_group, criterion_main};

const STATEMENTS: [(&str, &str); 3] = [
    ("point_read", "SELECT id, name, h3 FROM items WHERE h3 = $1 AND id = ANY($2) ORDER BY id LIMIT 100"),
    ("insert", "INSERT INTO items (id, name, h3) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING"),
    (
        "cte_window",
        "WITH recent AS (SELECT i.id, i.name, o.total FROM items i JOIN orders o ON o.item_id = i.id \
         WHERE o.created_at > now() - interval '1 day') \
         SELECT id, name, sum(total) OVER (PARTITION BY id ORDER BY name) AS running FROM recent",
    ),
];

fn bench(c: &mut Criterion) {
    let policy = Policy::default();
    let cache = ClassCache::default();
    for (name, sql) in STATEMENTS {
        c.bench_function(&format!("classify_uncached/{name}"), |b| {
            b.iter(|| classify(black_box(sql), Dialect::Postgres, &policy))
        });
        c.bench_function(&format!("classify_cached/{name}"), |b| {
            b.iter(|| cache.get_or_classify(black_box(sql), Dialect::Postgres, &policy))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
