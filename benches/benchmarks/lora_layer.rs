//! One LoRA projection (576 -> 1536, r = 8, 4 x 128 tokens), forward + backward: devft's
//! explicit low-rank path `x W + s (x A) B` against burn's built-in `apply_lora`, which folds
//! `W + s A B` into the weight on every forward.

use std::time::{Duration, Instant};

use burn::module::{Lora, Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, Throughput, criterion_group};
use devft::model::{LoraLinear, LowRankAdapter};

const D_IN: usize = 576;
const D_OUT: usize = 1536;
const RANK: usize = 8;
const TOKENS: usize = 512;

fn input(device: &Device) -> Tensor<3> {
    Tensor::random(
        [4, TOKENS / 4, D_IN],
        Distribution::Normal(0.0, 1.0),
        device,
    )
}

fn time(device: &Device, iters: u64, mut step: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    device.sync().expect("device sync");
    start.elapsed()
}

fn lora_layer(c: &mut Criterion) {
    let device = devft::device::default_device().unwrap().autodiff();
    let weight = Tensor::<2>::random([D_IN, D_OUT], Distribution::Normal(0.0, 0.02), &device);
    let a = Tensor::<2>::random([D_IN, RANK], Distribution::Normal(0.0, 0.02), &device);
    let b = Tensor::<2>::random([RANK, D_OUT], Distribution::Normal(0.0, 0.02), &device);

    let mut explicit = LoraLinear::frozen(weight.clone(), None);
    explicit.adapter = Some(LowRankAdapter::new(a, b, 2.0, 0.0));

    let mut builtin = LinearConfig::new(D_IN, D_OUT)
        .with_bias(false)
        .init(&device);
    builtin.weight = Param::from_tensor(weight);
    let builtin: Linear = builtin.apply_lora(Lora::new(RANK, 16.0));

    let mut group = c.benchmark_group("lora_projection_576x1536_r8_512_tokens");
    group.throughput(Throughput::Elements(TOKENS as u64));
    group.sample_size(20);
    group.bench_function("devft_explicit_low_rank_fwd_bwd", |bench| {
        bench.iter_custom(|iters| {
            time(&device, iters, || {
                let _ = explicit.forward(input(&device)).sum().backward();
            })
        })
    });
    group.bench_function("burn_apply_lora_fwd_bwd", |bench| {
        bench.iter_custom(|iters| {
            time(&device, iters, || {
                let _ = builtin.forward(input(&device)).sum().backward();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, lora_layer);
