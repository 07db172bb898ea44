//! Criterion benchmarks of devft. Run with `cargo bench`; results are recorded in
//! docs/performance.md.

use criterion::criterion_main;

mod benchmarks;

// mimalloc keeps freed large blocks for reuse; glibc's malloc returns each logits-sized
// temporary to the kernel and page-faults a fresh zeroed one on the next step (see
// docs/performance.md). A binary's choice, not the library's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_main! {
    benchmarks::lora_layer::benches,
    benchmarks::model_step::benches,
    benchmarks::devft_core::benches,
    benchmarks::aggregate::benches,
}
