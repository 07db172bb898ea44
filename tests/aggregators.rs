//! Aggregators against values computed by hand, table tests over every aggregator, and
//! rejection of inconsistent updates.

use std::collections::BTreeMap;

use devft::aggregate::{
    Aggregator, Bulyan, ClientUpdate, DpFixedClipping, FedAdagrad, FedAdam, FedAvg, FedAvgM,
    FedMedian, FedProx, FedSaLora, FedYogi, FfaLora, Krum, TrimmedMean,
};
use devft::{Error, HostTensor, ParamMap};

fn params(a: &[f32], b: &[f32]) -> ParamMap {
    let mut p = ParamMap::new();
    p.insert(
        "layers.0.q.lora_A.weight",
        HostTensor::new(vec![a.len()], a.to_vec()).unwrap(),
    );
    p.insert(
        "layers.0.q.lora_B.weight",
        HostTensor::new(vec![b.len()], b.to_vec()).unwrap(),
    );
    p
}

fn update(client: usize, p: ParamMap, n: usize) -> ClientUpdate {
    ClientUpdate {
        client,
        params: p,
        num_examples: n,
        metrics: BTreeMap::new(),
    }
}

fn values(p: &ParamMap, name: &str) -> Vec<f32> {
    p.get(name).unwrap().values().to_vec()
}

fn all_aggregators() -> Vec<Box<dyn Aggregator>> {
    vec![
        Box::new(FedAvg),
        Box::new(FedProx::new(0.01).unwrap()),
        Box::new(FedAvgM::default()),
        Box::new(FedAdam::default()),
        Box::new(FedYogi::default()),
        Box::new(FedAdagrad::default()),
        Box::new(FfaLora),
        Box::new(FedSaLora),
        Box::new(TrimmedMean::new(0.25).unwrap()),
        Box::new(FedMedian),
        Box::new(Krum::new(1)),
        Box::new(Krum::multi(1, 2)),
        // Needs n >= 4f + 3 = 7 updates.
        Box::new(Bulyan::new(1)),
        Box::new(DpFixedClipping::new(FedAvg, 0.0, 10.0, 4, 0).unwrap()),
    ]
}

#[test]
fn fedavg_is_the_example_weighted_mean() {
    // Prepare: two clients with 1 and 3 examples.
    let global = params(&[0.0, 0.0], &[0.0]);
    let updates = [
        update(0, params(&[1.0, 2.0], &[4.0]), 1),
        update(1, params(&[5.0, 6.0], &[8.0]), 3),
    ];
    // Execute.
    let new = FedAvg.aggregate(&global, &updates).unwrap();
    // Assert: (1*1 + 3*5)/4 = 4, (2 + 18)/4 = 5, (4 + 24)/4 = 7.
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [4.0, 5.0]);
    assert_eq!(values(&new, "layers.0.q.lora_B.weight"), [7.0]);
    assert_eq!(
        FedProx::new(0.3)
            .unwrap()
            .aggregate(&global, &updates)
            .unwrap(),
        new
    );
    assert_eq!(
        FedProx::new(0.3).unwrap().client_instructions().proximal_mu,
        0.3
    );
}

#[test]
fn ffa_lora_keeps_a_and_averages_b() {
    let global = params(&[9.0, 9.0], &[0.0]);
    let updates = [
        update(0, params(&[1.0, 1.0], &[2.0]), 1),
        update(1, params(&[3.0, 3.0], &[6.0]), 1),
    ];
    let new = FfaLora.aggregate(&global, &updates).unwrap();
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [9.0, 9.0]);
    assert_eq!(values(&new, "layers.0.q.lora_B.weight"), [4.0]);
    assert!(FfaLora.client_instructions().freeze_lora_a);
}

#[test]
fn fedsa_lora_averages_a_and_keeps_b() {
    let global = params(&[9.0, 9.0], &[5.0]);
    let updates = [
        update(0, params(&[1.0, 1.0], &[2.0]), 1),
        update(1, params(&[4.0, 7.0], &[6.0]), 2),
    ];
    let new = FedSaLora.aggregate(&global, &updates).unwrap();
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [3.0, 5.0]);
    assert_eq!(values(&new, "layers.0.q.lora_B.weight"), [5.0]);
    let instructions = FedSaLora.client_instructions();
    assert!(instructions.keeps_on_client("model.layers.3.mlp.up_proj.lora_B.weight"));
    assert!(!instructions.keeps_on_client("model.layers.3.mlp.up_proj.lora_A.weight"));
}

#[test]
fn trimmed_mean_drops_the_extremes_per_coordinate() {
    let global = params(&[0.0], &[0.0]);
    let updates: Vec<ClientUpdate> = [(1.0, 10.0), (2.0, -50.0), (3.0, 20.0), (100.0, 30.0)]
        .iter()
        .enumerate()
        .map(|(c, &(a, b))| update(c, params(&[a], &[b]), 1 + c * 10))
        .collect();
    let new = TrimmedMean::new(0.25)
        .unwrap()
        .aggregate(&global, &updates)
        .unwrap();
    // One cut from each end, unweighted: mean(2, 3) and mean(10, 20).
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [2.5]);
    assert_eq!(values(&new, "layers.0.q.lora_B.weight"), [15.0]);
}

#[test]
fn krum_picks_the_update_with_the_closest_neighbours() {
    let global = params(&[0.0], &[0.0]);
    let updates: Vec<ClientUpdate> = [0.0, 1.0, 1.5, 10.0]
        .iter()
        .enumerate()
        .map(|(c, &v)| update(c, params(&[v], &[0.0]), 1))
        .collect();
    // n = 4, f = 1: one neighbour each. Squared distances to the nearest other:
    // 0 -> 1 (1), 1 -> 1.5 (0.25), 1.5 -> 1 (0.25), 10 -> 1.5 (72.25). Ties go to the first.
    let new = Krum::new(1).aggregate(&global, &updates).unwrap();
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [1.0]);
    let new = Krum::multi(1, 2).aggregate(&global, &updates).unwrap();
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [1.25]);
}

#[test]
fn dp_clips_each_update_against_the_global_before_averaging() {
    let global = params(&[1.0, 1.0], &[1.0]);
    // Client 0 moves by (3, 4, 0): norm 5, clipped to 1 -> (0.6, 0.8, 0).
    // Client 1 moves by (0, 0, 0.5): norm 0.5, unclipped.
    let updates = [
        update(0, params(&[4.0, 5.0], &[1.0]), 1),
        update(1, params(&[1.0, 1.0], &[1.5]), 1),
    ];
    let mut dp = DpFixedClipping::new(FedAvg, 0.0, 1.0, 2, 0).unwrap();
    let new = dp.aggregate(&global, &updates).unwrap();
    let a = values(&new, "layers.0.q.lora_A.weight");
    assert!(
        (a[0] - 1.3).abs() < 1e-6 && (a[1] - 1.4).abs() < 1e-6,
        "{a:?}"
    );
    assert!((values(&new, "layers.0.q.lora_B.weight")[0] - 1.25).abs() < 1e-6);
}

#[test]
fn dp_noise_has_the_announced_standard_deviation() {
    let n = 20_000;
    let zeros = vec![0.0f32; n];
    let global = params(&zeros, &[0.0]);
    let updates = [update(0, params(&zeros, &[0.0]), 1)];
    let mut dp = DpFixedClipping::new(FedAvg, 2.0, 0.5, 4, 7).unwrap();
    assert_eq!(dp.noise_stddev(), 0.25);
    let noisy = dp.aggregate(&global, &updates).unwrap();
    let v = values(&noisy, "layers.0.q.lora_A.weight");
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
    let std = (v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n as f64)
        .sqrt();
    assert!(
        mean.abs() < 0.01 && (std - 0.25).abs() < 0.01,
        "mean {mean}, std {std}"
    );
}

#[test]
fn identical_updates_leave_the_global_unchanged_for_every_aggregator() {
    let global = params(&[0.5, -1.0], &[2.0]);
    for mut aggregator in all_aggregators() {
        // Seven clients: the most any aggregator of the table needs (Bulyan with f = 1).
        let updates: Vec<ClientUpdate> = (0..7).map(|c| update(c, global.clone(), 5 + c)).collect();
        for _ in 0..3 {
            let new = aggregator.aggregate(&global, &updates).unwrap();
            for (name, tensor) in new.iter() {
                for (x, y) in tensor
                    .values()
                    .iter()
                    .zip(global.get(name).unwrap().values())
                {
                    assert!((x - y).abs() < 1e-6, "{}: {name} moved", aggregator.name());
                }
            }
        }
    }
}

#[test]
fn dp_with_zero_noise_and_huge_clip_equals_the_inner_aggregator() {
    let global = params(&[0.5, -1.0], &[2.0]);
    let updates: Vec<ClientUpdate> = (0..3)
        .map(|c| update(c, params(&[c as f32, 1.0], &[-(c as f32)]), 1 + c))
        .collect();
    let mut plain = FedAdam::default();
    let mut wrapped = DpFixedClipping::new(FedAdam::default(), 0.0, 1e9, 3, 0).unwrap();
    let mut g1 = global.clone();
    let mut g2 = global.clone();
    for _ in 0..3 {
        g1 = plain.aggregate(&g1, &updates).unwrap();
        g2 = wrapped.aggregate(&g2, &updates).unwrap();
    }
    assert_eq!(g1, g2);
}

#[test]
fn fedavgm_without_momentum_and_unit_rate_is_fedavg() {
    let global = params(&[0.0, 1.0], &[2.0]);
    let updates = [
        update(0, params(&[1.0, 2.0], &[4.0]), 2),
        update(1, params(&[3.0, 0.0], &[1.0]), 1),
    ];
    let a = FedAvgM::new(1.0, 0.0)
        .unwrap()
        .aggregate(&global, &updates)
        .unwrap();
    let b = FedAvg.aggregate(&global, &updates).unwrap();
    for (name, t) in a.iter() {
        for (x, y) in t.values().iter().zip(b.get(name).unwrap().values()) {
            assert!((x - y).abs() < 1e-6);
        }
    }
}

#[test]
fn server_state_round_trips_and_resumes_identically() {
    let global = params(&[0.0, 1.0], &[2.0]);
    let updates = [
        update(0, params(&[1.0, 2.0], &[4.0]), 2),
        update(1, params(&[3.0, 0.0], &[1.0]), 1),
        update(2, params(&[-1.0, 0.5], &[2.5]), 3),
    ];
    for make in [
        || Box::new(FedAdam::default()) as Box<dyn Aggregator>,
        || Box::new(FedYogi::default()) as Box<dyn Aggregator>,
        || Box::new(FedAdagrad::default()) as Box<dyn Aggregator>,
        || Box::new(FedAvgM::default()) as Box<dyn Aggregator>,
        || Box::new(FedMedian) as Box<dyn Aggregator>,
        // Three updates allow f = 0 only (n >= 4f + 3).
        || Box::new(Bulyan::new(0)) as Box<dyn Aggregator>,
        || {
            Box::new(DpFixedClipping::new(FedAdagrad::default(), 0.5, 1.0, 2, 3).unwrap())
                as Box<dyn Aggregator>
        },
    ] {
        let mut straight = make();
        let g1 = straight.aggregate(&global, &updates).unwrap();
        let g2 = straight.aggregate(&g1, &updates).unwrap();

        let mut first = make();
        let h1 = first.aggregate(&global, &updates).unwrap();
        let bytes = first.state().to_safetensors_bytes().unwrap();
        let mut resumed = make();
        resumed
            .load_state(&ParamMap::from_safetensors_bytes(&bytes, "state").unwrap())
            .unwrap();
        let h2 = resumed.aggregate(&h1, &updates).unwrap();
        assert_eq!(g2, h2, "{}", straight.name());
    }
}

#[test]
fn adaptive_optimisers_are_distinct_and_refuse_each_others_state() {
    let global = params(&[0.0, 1.0], &[2.0]);
    let updates = [
        update(0, params(&[1.0, 2.0], &[4.0]), 2),
        update(1, params(&[3.0, 0.0], &[1.0]), 1),
    ];
    let makers: [fn() -> Box<dyn Aggregator>; 3] = [
        || Box::new(FedAdam::default()),
        || Box::new(FedYogi::default()),
        || Box::new(FedAdagrad::default()),
    ];
    let names: Vec<String> = makers.iter().map(|make| make().name()).collect();
    assert_eq!(
        names,
        [
            "fedadam(eta=0.1)",
            "fedyogi(eta=0.01)",
            "fedadagrad(eta=0.1)"
        ]
    );
    for (i, make_writer) in makers.iter().enumerate() {
        let mut writer = make_writer();
        writer.aggregate(&global, &updates).unwrap();
        let state = writer.state();
        for (j, make_reader) in makers.iter().enumerate() {
            let mut reader = make_reader();
            let loaded = reader.load_state(&state);
            if i == j {
                loaded.unwrap();
                continue;
            }
            let err = loaded.unwrap_err();
            let (wrote, read) = (names[i].split('(').next(), names[j].split('(').next());
            assert!(
                matches!(&err, Error::InvalidArgument(m)
                    if m.contains(wrote.unwrap()) && m.contains(read.unwrap())),
                "{err}"
            );
            // A refused state leaves the reader as it was.
            assert_eq!(reader.state(), make_reader().state());
        }
        // Through the DP wrapper too.
        let mut dp = DpFixedClipping::new(make_writer(), 0.0, 1.0, 2, 0).unwrap();
        dp.aggregate(&global, &updates).unwrap();
        let mut other = DpFixedClipping::new(makers[(i + 1) % 3](), 0.0, 1.0, 2, 0).unwrap();
        assert!(matches!(
            other.load_state(&dp.state()),
            Err(Error::InvalidArgument(_))
        ));
    }
    // A state missing its moments' partner, or with a stray key, is refused as well.
    let mut adam = FedAdam::default();
    adam.aggregate(&global, &updates).unwrap();
    let mut partial = ParamMap::new();
    for (name, tensor) in adam.state().iter() {
        if !name.starts_with("fedadam.v.") {
            partial.insert(name, tensor.clone());
        }
    }
    assert!(matches!(
        FedAdam::default().load_state(&partial),
        Err(Error::InvalidArgument(_))
    ));
    let mut stray = adam.state();
    stray.insert("m.layers.0.q.lora_A.weight", HostTensor::zeros(vec![2]));
    assert!(matches!(
        FedAdam::default().load_state(&stray),
        Err(Error::InvalidArgument(_))
    ));
    assert!(FedAdagrad::new(0.0, 1e-9).is_err() && FedYogi::new(0.01, 1.0, 0.9, 1e-3).is_err());
    assert!(FedAdam::new(0.1, 0.9, 0.99, 0.0).is_err());
}

#[test]
fn fedmedian_is_the_unweighted_coordinate_wise_median() {
    let global = params(&[0.0, 0.0], &[0.0]);
    // Coordinate 0: 1, 9, 2, 4 -> sorted 1, 2, 4, 9 -> (2 + 4) / 2 = 3.
    // Coordinate 1: -1, 0.5, 7, 0.25 -> (0.25 + 0.5) / 2 = 0.375. B: 10, -3, 5, 6 -> 5.5.
    let updates: Vec<ClientUpdate> = [
        ([1.0, -1.0], 10.0),
        ([9.0, 0.5], -3.0),
        ([2.0, 7.0], 5.0),
        ([4.0, 0.25], 6.0),
    ]
    .iter()
    .enumerate()
    .map(|(c, (a, b))| update(c, params(a, &[*b]), 1 + 100 * c))
    .collect();
    let new = FedMedian.aggregate(&global, &updates).unwrap();
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [3.0, 0.375]);
    assert_eq!(values(&new, "layers.0.q.lora_B.weight"), [5.5]);
    // Odd count: the middle value itself (1, 2, 9 -> 2).
    let new = FedMedian.aggregate(&global, &updates[..3]).unwrap();
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [2.0, 0.5]);
    assert_eq!(FedMedian.name(), "fedmedian");
    let mut nan = updates.clone();
    nan[2].params = params(&[f32::NAN, 0.0], &[0.0]);
    assert!(matches!(
        FedMedian.aggregate(&global, &nan),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn bulyan_leaves_out_the_outlier() {
    let global = params(&[0.0], &[0.0]);
    // Seven clients, f = 1: theta = 5 selections, then per coordinate the mean of the
    // beta = 3 selected values closest to their median.
    let a = [1.0, 1.5, 3.0, 2.5, 6.0, 2.0, 40.0];
    let b = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -40.0];
    let updates: Vec<ClientUpdate> = (0..7)
        .map(|c| update(c, params(&[a[c]], &[b[c]]), 1 + 50 * c))
        .collect();
    // By hand (squared distances, one client at a time):
    // 1. all 7, 4 neighbours each: 2.0 scores .25+.25+1+1 = 2.5, the lowest -> pick 2.0;
    // 2. 6 left, 3 neighbours: 1.5 and 2.5 both score 3.5 -> the earlier, 1.5;
    // 3. 5 left, 2 neighbours: 2.5 scores .25 + 2.25 = 2.5 -> 2.5;
    // 4. 4 left (1, 3, 6, 40), 1 neighbour: 1 and 3 both score 4 -> 1;
    // 5. 3 left (3, 6, 40): 3 and 6 both score 9 -> 3.
    // Selected {2, 1.5, 2.5, 1, 3}: median 2, nearest three 1.5, 2, 2.5 -> mean 2.
    // 6 and the outlier 40 (and its -40) are left out, so B stays 0.
    let new = Bulyan::new(1).aggregate(&global, &updates).unwrap();
    assert_eq!(values(&new, "layers.0.q.lora_A.weight"), [2.0]);
    assert_eq!(values(&new, "layers.0.q.lora_B.weight"), [0.0]);
    // f = 0 is the unweighted mean: (1 + 1.5 + 3 + 2.5 + 6 + 2 + 40) / 7 = 8.
    let new = Bulyan::new(0).aggregate(&global, &updates).unwrap();
    assert!((values(&new, "layers.0.q.lora_A.weight")[0] - 8.0).abs() < 1e-6);
    assert_eq!(Bulyan::new(1).name(), "bulyan(f=1)");
    // Too few updates for f: a typed error naming n and f, no panic.
    for (f, n) in [(1, 6), (2, 10), (usize::MAX, 7)] {
        let updates: Vec<ClientUpdate> = (0..n)
            .map(|c| update(c, params(&[c as f32], &[0.0]), 1))
            .collect();
        let err = Bulyan::new(f).aggregate(&global, &updates).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m)
                if m.contains(&format!("f = {f}")) && m.contains(&format!("n = {n}"))),
            "{err}"
        );
    }
    assert!(matches!(
        Bulyan::new(0).aggregate(&global, &[]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn inconsistent_updates_are_rejected_naming_the_client() {
    let global = params(&[0.0, 1.0], &[2.0]);
    let mut nan = params(&[0.0, f32::NAN], &[2.0]);
    let err = FedAvg
        .aggregate(&global, &[update(7, nan.clone(), 1)])
        .unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { name } if name.contains("client 7")),
        "{err}"
    );
    nan.insert("layers.0.q.lora_A.weight", HostTensor::zeros(vec![3]));
    let err = FedAvg.aggregate(&global, &[update(3, nan, 1)]).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name.contains("client 3")),
        "{err}"
    );
    let err = FedAvg
        .aggregate(&global, &[update(2, global.clone(), 0)])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(matches!(
        FedAvg.aggregate(&global, &[]),
        Err(Error::InvalidArgument(_))
    ));
    let mut extra = global.clone();
    extra.insert("other", HostTensor::zeros(vec![1]));
    assert!(matches!(
        FedAvg.aggregate(&global, &[update(1, extra, 1)]),
        Err(Error::UnexpectedTensor { .. })
    ));
    assert!(FedProx::new(-1.0).is_err() && TrimmedMean::new(0.5).is_err());
    assert!(DpFixedClipping::new(FedAvg, 1.0, 0.0, 1, 0).is_err());
}

/// Flower 1.42's own strategies over three rounds, on a 4-client scenario and, for Bulyan
/// (which needs `n >= 4f + 3`), a 7-client one
/// (`tests/fixtures/flower/make_flower_reference.py`).
#[test]
fn aggregators_match_flower_over_three_rounds() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/flower/flower_reference.json"
    );
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let flat = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let cases: Vec<(&str, Box<dyn Aggregator>)> = vec![
        ("FedAvg", Box::new(FedAvg)),
        ("FedAvgM", Box::new(FedAvgM::new(1.0, 0.9).unwrap())),
        (
            "FedAdam",
            Box::new(FedAdam::new(0.1, 0.9, 0.99, 1e-9).unwrap()),
        ),
        (
            "FedYogi",
            Box::new(FedYogi::new(0.01, 0.9, 0.99, 1e-3).unwrap()),
        ),
        ("FedAdagrad", Box::new(FedAdagrad::new(0.1, 1e-9).unwrap())),
        ("FedTrimmedAvg", Box::new(TrimmedMean::new(0.25).unwrap())),
        ("Krum", Box::new(Krum::new(1))),
        ("MultiKrum", Box::new(Krum::multi(1, 2))),
        (
            "DPServerSideFixedClipping_FedAvg",
            Box::new(DpFixedClipping::new(FedAvg, 0.0, 0.05, 4, 0).unwrap()),
        ),
        ("FedMedian", Box::new(FedMedian)),
        ("FedMedian_7clients", Box::new(FedMedian)),
        ("Bulyan", Box::new(Bulyan::new(1))),
    ];
    for (name, mut aggregator) in cases {
        let strategy = &reference["strategies"][name];
        let scenario = &reference[strategy["scenario"].as_str().unwrap_or("scenario")];
        let num_examples: Vec<usize> = scenario["num_examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let deltas = &scenario["deltas_flat[t-1][c]"];
        let mut global = ParamMap::new();
        for array in scenario["arrays"].as_array().unwrap() {
            let shape: Vec<usize> = array["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let initial = flat(&array["initial"]).iter().map(|&v| v as f32).collect();
            global.insert(
                array["name"].as_str().unwrap(),
                HostTensor::new(shape, initial).unwrap(),
            );
        }
        let rounds = strategy["rounds"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}"));
        for (t, expected) in rounds.iter().enumerate() {
            let updates: Vec<ClientUpdate> = (0..num_examples.len())
                .map(|c| {
                    let d = flat(&deltas[t][c]);
                    let mut p = ParamMap::new();
                    for (key, range) in [("a", 0..6), ("b", 6..10)] {
                        let g = global.get(key).unwrap();
                        let v = g
                            .values()
                            .iter()
                            .zip(&d[range])
                            .map(|(x, dx)| (f64::from(*x) + dx) as f32)
                            .collect();
                        p.insert(key, HostTensor::new(g.shape().to_vec(), v).unwrap());
                    }
                    update(c, p, num_examples[c])
                })
                .collect();
            global = aggregator.aggregate(&global, &updates).unwrap();
            for key in ["a", "b"] {
                let want = flat(&expected["global"][key]);
                let ours = global.get(key).unwrap().values();
                assert_eq!(ours.len(), want.len(), "{name} round {}: {key}", t + 1);
                for (ours, theirs) in ours.iter().zip(&want) {
                    assert!(
                        (f64::from(*ours) - theirs).abs() < 2e-6,
                        "{name} round {}: {key} {ours} vs {theirs}",
                        t + 1
                    );
                }
            }
        }
    }
}
