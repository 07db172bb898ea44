//! The real SmolLM2-135M-Instruct Q4_1 GGUF with its frozen base decoded to f32 or kept in
//! its blocks (`DEVFT_BASE=f32|quantised`, one variant per process so that each process's
//! peak RSS is its own): a LoRA training step (forward + backward + AdamW on the adapters,
//! r = 8, alpha = 16 on all seven projections) and an inference forward pass on a batch of
//! 4 x 128 tokens, as `benches/model_step.rs` runs on a random model of the same shape.
//! Loading's peak RSS, the weights' bytes and the training steps' peak RSS go to
//! `target/base-weights-<base>.json`. `benches/base_weights.sh` runs both variants back to
//! back. The model comes from the asset cache (the main job fetches it); without it the
//! bench says so and measures nothing.

use std::time::{Duration, Instant};

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use devft::federated::measure_peak_rss;
use devft::model::gguf::BaseWeights;
use devft::model::{CausalLm, LoraConfig, next_token_loss};
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

fn base_weights(c: &mut Criterion) {
    let base: BaseWeights = std::env::var("DEVFT_BASE")
        .unwrap_or_else(|_| "f32".into())
        .parse()
        .expect("DEVFT_BASE is f32 or quantised");
    let path = devft::assets::cache_dir().join(devft::assets::SMOLLM2_135M_INSTRUCT.cache_path);
    if !path.exists() {
        eprintln!(
            "NOT MEASURED: {} is absent (the main job fetches it)",
            path.display()
        );
        return;
    }
    let name = format!("{base:?}").to_lowercase();
    let device = devft::device::default_device().unwrap().autodiff();
    let (model, load_peak) = measure_peak_rss(|| CausalLm::load_with(&path, base, &device));
    let model = model
        .and_then(|m| m.with_lora(&LoraConfig::new(8, 16.0), 0))
        .expect("the cached model loads");
    let weight_bytes = model.weight_bytes();
    let vocab = model.config().vocab_size;

    let mut group = c.benchmark_group(format!("smollm2_gguf_{name}_base_4x128"));
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));

    let ids = batch(vocab, &device);
    let mut trained = Some(model);
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.01).init();
    let mut step_peak = None;
    group.bench_function("lora_train_step", |bench| {
        bench.iter_custom(|iters| {
            let (elapsed, peak) = measure_peak_rss(|| {
                let start = Instant::now();
                for _ in 0..iters {
                    let model = trained.take().expect("model present");
                    let loss = next_token_loss(model.forward(ids.clone()), ids.clone(), None);
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    trained = Some(optimizer.step(1e-4, model, grads));
                }
                device.sync().expect("device sync");
                start.elapsed()
            });
            step_peak = step_peak.max(peak);
            elapsed
        })
    });

    let inference = trained.take().expect("model present").valid();
    let inner = devft::device::default_device().unwrap();
    let ids = batch(vocab, &inner);
    group.bench_function("inference_forward", |bench| {
        bench.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let _ = inference.forward(ids.clone());
            }
            inner.sync().expect("device sync");
            start.elapsed()
        })
    });
    group.finish();

    let report = serde_json::json!({
        "base": name,
        "weight_bytes": weight_bytes,
        "load_peak_rss_bytes": load_peak,
        "train_step_peak_rss_bytes": step_peak,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/base-weights-{name}.json"));
    std::fs::write(&out, report.to_string()).expect("target/ is writable");
}

criterion_group!(benches, base_weights);
criterion_main!(benches);
