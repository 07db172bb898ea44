//! A LoRA training step (forward + backward + AdamW on the adapters) and an inference forward
//! pass on a randomly initialised model with SmolLM2-135M's shape, batch 4 x 128 tokens,
//! LoRA r = 8, alpha = 16 on all seven projections. `benches/peft_train_step.py` runs the same
//! with PyTorch + PEFT; `benches/side_by_side.sh` runs both back to back. A bench target of its
//! own, so that its process's peak RSS is the training step's.

use std::time::{Duration, Instant};

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use devft::model::{CausalLm, DecoderConfig, LoraConfig, next_token_loss};
use rand::{Rng, SeedableRng};

const BATCH: usize = 4;
const SEQ: usize = 128;

fn batch(vocab: usize, device: &Device) -> Tensor<2, Int> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|_| rng.random_range(0..vocab as i64))
        .collect();
    Tensor::from_data(TensorData::new(ids, [BATCH, SEQ]), device)
}

fn model(device: &Device) -> CausalLm {
    CausalLm::random(DecoderConfig::smollm2_135m(), 0, device)
        .and_then(|m| m.with_lora(&LoraConfig::new(8, 16.0), 0))
        .expect("valid model")
}

fn model_step(c: &mut Criterion) {
    // As the main job does: freed temporaries stay in the heap for the next step (the side-by-
    // side script gives PyTorch's process the same glibc setting).
    devft::allocator::retain_freed_memory();
    let device = devft::device::default_device().unwrap();
    let train_device = device.clone().autodiff();
    let mut group = c.benchmark_group("smollm2_135m_shape_4x128");
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));

    let ids = batch(49152, &train_device);
    let mut trained = Some(model(&train_device));
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.01).init();
    group.bench_function("lora_train_step", |bench| {
        bench.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let model = trained.take().expect("model present");
                let loss = next_token_loss(model.forward(ids.clone()), ids.clone(), None);
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                trained = Some(optimizer.step(1e-4, model, grads));
            }
            train_device.sync().expect("device sync");
            start.elapsed()
        })
    });

    let ids = batch(49152, &device);
    let inference = model(&device);
    group.bench_function("inference_forward", |bench| {
        bench.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let _ = inference.forward(ids.clone());
            }
            device.sync().expect("device sync");
            start.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, model_step);
criterion_main!(benches);
