//! Spectral grouping (layer similarity + eigen-decomposition + k-means) and differential fusion
//! on SmolLM2-135M's shape (a random model with LoRA r = 8) and on a Llama-7B shape (32 layers,
//! hidden 4096, MLP 11008) whose layers are produced on demand, so that only one projection's
//! tensors across layers are ever resident. Peak resident memory is printed after each
//! benchmark (`VmHWM`, cumulative over the process: run one benchmark per process, with a
//! filter, to read its own peak).

use std::time::Duration;

use criterion::{Criterion, criterion_group};
use devft::fusion::{DifferentialFuser, fuse_layers};
use devft::grouping::{LayerGrouper, LayerSource, SpectralGrouper};
use devft::model::{CausalLm, DecoderConfig, LoraConfig, Projection, layer_tensor_specs};
use devft::transfer::build_submodel;
use devft::{HostTensor, ParamMap};
use rand::{Rng, SeedableRng};

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "VmHWM unavailable".into())
}

fn llama7b_config() -> DecoderConfig {
    DecoderConfig {
        hidden_size: 4096,
        intermediate_size: 11008,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 128,
        vocab_size: 32000,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        ..DecoderConfig::smollm2_135m()
    }
}

fn random_tensor(shape: Vec<usize>, seed: u64) -> HostTensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let len = shape.iter().product();
    let values = (0..len).map(|_| rng.random_range(-0.02f32..0.02)).collect();
    HostTensor::new(shape, values).unwrap()
}

/// Llama-7B-shaped layers made on demand: one random tensor per projection, rotated and scaled
/// differently for each layer, so each call allocates one fresh projection-sized tensor.
struct Synthetic7b {
    bases: Vec<HostTensor>,
}

impl Synthetic7b {
    fn new() -> Self {
        let config = llama7b_config();
        let bases = layer_tensor_specs(&config)
            .into_iter()
            .filter(|s| s.shape.len() == 2)
            .enumerate()
            .map(|(i, s)| random_tensor(s.shape, i as u64))
            .collect();
        Self { bases }
    }
}

impl LayerSource for Synthetic7b {
    fn num_layers(&self) -> usize {
        32
    }

    fn effective_weight(&self, layer: usize, projection: Projection) -> devft::Result<HostTensor> {
        let p = Projection::ALL
            .iter()
            .position(|&q| q == projection)
            .unwrap();
        let base = &self.bases[p];
        let shift = (layer * 7919) % base.len();
        let scale = 1.0 + 0.01 * layer as f32;
        let mut values = Vec::with_capacity(base.len());
        values.extend(base.values()[shift..].iter().map(|v| v * scale));
        values.extend(base.values()[..shift].iter().map(|v| v * scale));
        HostTensor::new(base.shape().to_vec(), values)
    }
}

fn smollm2(c: &mut Criterion) {
    let device = devft::device::default_device().unwrap();
    let model = CausalLm::random(DecoderConfig::smollm2_135m(), 0, &device)
        .and_then(|m| m.with_lora(&LoraConfig::new(8, 16.0), 0))
        .unwrap();
    let mut group = c.benchmark_group("devft_core_smollm2_135m");
    group.sample_size(10);
    group.bench_function("spectral_grouping_k4", |b| {
        b.iter(|| SpectralGrouper::new().group(&model, 4).unwrap())
    });
    eprintln!("after spectral_grouping_k4 (SmolLM2): {}", peak_rss());
    let grouping = SpectralGrouper::new().group(&model, 4).unwrap();
    let fuser = DifferentialFuser::default();
    group.bench_function("build_submodel_k4_differential", |b| {
        b.iter(|| build_submodel(&model, &grouping, &fuser).unwrap())
    });
    eprintln!("after build_submodel_k4 (SmolLM2): {}", peak_rss());
    group.finish();
}

fn llama7b(c: &mut Criterion) {
    let mut group = c.benchmark_group("devft_core_llama7b_shape");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(60));
    let layers = Synthetic7b::new();
    group.bench_function("spectral_grouping_k8_streaming", |b| {
        b.iter(|| SpectralGrouper::new().group(&layers, 8).unwrap())
    });
    eprintln!("after spectral_grouping_k8 (7B): {}", peak_rss());
    drop(layers);

    // One group of four full layers (base + LoRA r = 32), fused tensor by tensor.
    let config = llama7b_config();
    let lora_shapes: Vec<(String, Vec<usize>)> = Projection::ALL
        .iter()
        .flat_map(|&p| {
            let [d_in, d_out] = devft::model::projection_dims(&config, p);
            [
                (format!("{}.lora_A.weight", p.path()), vec![32, d_in]),
                (format!("{}.lora_B.weight", p.path()), vec![d_out, 32]),
            ]
        })
        .collect();
    let members: Vec<ParamMap> = (0..4u64)
        .map(|m| {
            let mut params = ParamMap::new();
            for (i, spec) in layer_tensor_specs(&config).into_iter().enumerate() {
                params.insert(spec.name, random_tensor(spec.shape, m * 100 + i as u64));
            }
            for (i, (name, shape)) in lora_shapes.iter().enumerate() {
                params.insert(
                    name.clone(),
                    random_tensor(shape.clone(), m * 1000 + i as u64),
                );
            }
            params
        })
        .collect();
    let fuser = DifferentialFuser::default();
    group.bench_function("fuse_group_of_4_layers_differential", |b| {
        b.iter(|| fuse_layers(&fuser, &members).unwrap())
    });
    eprintln!("after fuse_group_of_4 (7B): {}", peak_rss());
    group.finish();
}

criterion_group!(benches, smollm2, llama7b);
