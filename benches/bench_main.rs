//! Criterion benchmarks of devft. Run with `cargo bench`; results are recorded in
//! docs/performance.md.

use criterion::criterion_main;

mod benchmarks;

criterion_main! {
    benchmarks::lora_layer::benches,
    benchmarks::devft_core::benches,
    benchmarks::aggregate::benches,
}
