//! FedAvg of 20 client adapters of a Llama-7B shape (LoRA r = 32 on all seven projections of
//! 32 layers: 79,953,920 values per client). `benches/flower_fedavg.py` times Flower's
//! `aggregate` on the same arrays (same deterministic values).

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group};
use devft::aggregate::{Aggregator, ClientUpdate, FedAvg};
use devft::{HostTensor, ParamMap};

const CLIENTS: usize = 20;
const RANK: usize = 32;

/// `(name, shape)` of every LoRA tensor, in the order the Python script uses.
fn lora_shapes() -> Vec<(String, Vec<usize>)> {
    let dims = [
        ("self_attn.q_proj", 4096, 4096),
        ("self_attn.k_proj", 4096, 4096),
        ("self_attn.v_proj", 4096, 4096),
        ("self_attn.o_proj", 4096, 4096),
        ("mlp.gate_proj", 4096, 11008),
        ("mlp.up_proj", 4096, 11008),
        ("mlp.down_proj", 11008, 4096),
    ];
    (0..32)
        .flat_map(|l| {
            dims.iter().flat_map(move |&(p, d_in, d_out)| {
                [
                    (
                        format!("model.layers.{l}.{p}.lora_A.weight"),
                        vec![RANK, d_in],
                    ),
                    (
                        format!("model.layers.{l}.{p}.lora_B.weight"),
                        vec![d_out, RANK],
                    ),
                ]
            })
        })
        .collect()
}

/// The Python script's values: `((i * 2654435761 + k * 40503 + c * 97) mod 1000003) / 1000003 - 0.5`.
fn client_params(client: usize) -> ParamMap {
    lora_shapes()
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let len: usize = shape.iter().product();
            let values = (0..len as u64)
                .map(|i| {
                    let x =
                        (i * 2_654_435_761 + k as u64 * 40_503 + client as u64 * 97) % 1_000_003;
                    (x as f64 / 1_000_003.0 - 0.5) as f32
                })
                .collect();
            (name, HostTensor::new(shape, values).unwrap())
        })
        .collect()
}

fn fedavg_7b(c: &mut Criterion) {
    let updates: Vec<ClientUpdate> = (0..CLIENTS)
        .map(|c| ClientUpdate {
            client: c,
            params: client_params(c),
            num_examples: 100 + c,
            metrics: BTreeMap::new(),
        })
        .collect();
    let global = updates[0].params.clone();
    let result = FedAvg.aggregate(&global, &updates).unwrap();
    let first = result
        .get("model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    let last = result
        .get("model.layers.31.mlp.down_proj.lora_B.weight")
        .unwrap();
    let checksum = |t: &HostTensor| t.values()[..10].iter().map(|&v| f64::from(v)).sum::<f64>();
    eprintln!(
        "checksum_first {} checksum_last {}",
        checksum(first),
        checksum(last)
    );

    let mut group = c.benchmark_group("fedavg_llama7b_lora_r32");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(
        4 * (CLIENTS * global.num_values()) as u64,
    ));
    group.bench_function("20_clients", |b| {
        b.iter(|| FedAvg.aggregate(&global, &updates).unwrap())
    });
    group.finish();
}

criterion_group!(benches, fedavg_7b);
