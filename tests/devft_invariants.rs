//! Property tests of grouping, fusion, scheduling and transfer invariants, and the typed
//! errors of invalid requests.

mod common;

use common::*;
use devft::fusion::{AnchorFuser, DifferentialFuser, LayerFuser, MeanFuser, fuse_layers};
use devft::grouping::{
    EvenGrouper, Grouping, LayerCount, LayerGrouper, LayerSource, RandomGrouper, SpectralGrouper,
    layer_similarity,
};
use devft::model::{CausalLm, Projection, import_adapter};
use devft::schedule::{ExplicitScheduler, GeometricScheduler, Stage, StageScheduler};
use devft::transfer::{build_submodel, transfer_lora};
use devft::{Error, HostTensor, ParamMap};
use proptest::prelude::*;

/// Layers with small random projection weights, for groupers that read weights.
struct SyntheticLayers {
    weights: Vec<Vec<HostTensor>>,
}

impl SyntheticLayers {
    fn new(values: &[f32], num_layers: usize) -> Self {
        let per_layer = values.len() / num_layers;
        let weights = (0..num_layers)
            .map(|l| {
                let chunk = &values[l * per_layer..(l + 1) * per_layer];
                Projection::ALL
                    .iter()
                    .enumerate()
                    .map(|(p, _)| {
                        let v: Vec<f32> = (0..6)
                            .map(|i| chunk[(p * 6 + i) % per_layer] + 0.01)
                            .collect();
                        HostTensor::new(vec![2, 3], v).unwrap()
                    })
                    .collect()
            })
            .collect();
        Self { weights }
    }
}

impl LayerSource for SyntheticLayers {
    fn num_layers(&self) -> usize {
        self.weights.len()
    }

    fn effective_weight(&self, layer: usize, projection: Projection) -> devft::Result<HostTensor> {
        let p = Projection::ALL
            .iter()
            .position(|&q| q == projection)
            .unwrap();
        Ok(self.weights[layer][p].clone())
    }
}

fn assert_partition(grouping: &Grouping, k: usize, n: usize) {
    assert_eq!(grouping.len(), k);
    let mut all: Vec<usize> = grouping.groups().concat();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>());
    assert!(grouping.groups().iter().all(|g| !g.is_empty()));
    assert!(
        grouping.groups().windows(2).all(|w| w[0][0] < w[1][0]),
        "ordered by anchor"
    );
}

fn tensor_strategy() -> impl Strategy<Value = Vec<HostTensor>> {
    (1usize..5, 1usize..4, 1usize..4).prop_flat_map(|(members, rows, cols)| {
        prop::collection::vec(prop::collection::vec(-10.0f32..10.0, rows * cols), members).prop_map(
            move |tensors| {
                tensors
                    .into_iter()
                    .map(|v| HostTensor::new(vec![rows, cols], v).unwrap())
                    .collect()
            },
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_grouper_returns_a_partition_into_exactly_k_groups(
        (n, k) in (1usize..12).prop_flat_map(|n| (Just(n), 1..=n)),
        values in prop::collection::vec(-1.0f32..1.0, 12 * 42),
        seed in 0u64..1000,
    ) {
        let layers = SyntheticLayers::new(&values, n);
        assert_partition(&SpectralGrouper::new().with_seed(seed).group(&layers, k).unwrap(), k, n);
        assert_partition(&EvenGrouper.group(&LayerCount(n), k).unwrap(), k, n);
        assert_partition(&RandomGrouper::new(seed).group(&LayerCount(n), k).unwrap(), k, n);
        let singletons = SpectralGrouper::new().group(&layers, n).unwrap();
        prop_assert_eq!(singletons, Grouping::singletons(n));
    }

    #[test]
    fn same_seed_gives_the_same_grouping(seed in 0u64..1000, values in prop::collection::vec(-1.0f32..1.0, 8 * 42)) {
        let layers = SyntheticLayers::new(&values, 8);
        prop_assert_eq!(
            SpectralGrouper::new().with_seed(seed).group(&layers, 3).unwrap(),
            SpectralGrouper::new().with_seed(seed).group(&layers, 3).unwrap()
        );
        prop_assert_eq!(
            RandomGrouper::new(seed).group(&LayerCount(8), 3).unwrap(),
            RandomGrouper::new(seed).group(&LayerCount(8), 3).unwrap()
        );
    }

    #[test]
    fn differential_with_beta_zero_is_anchor_fusion(members in tensor_strategy()) {
        let refs: Vec<&HostTensor> = members.iter().collect();
        prop_assert_eq!(
            DifferentialFuser::new(0.0).unwrap().fuse_tensor("t", &refs).unwrap(),
            AnchorFuser.fuse_tensor("t", &refs).unwrap()
        );
    }

    #[test]
    fn a_group_of_one_fuses_to_itself(members in tensor_strategy(), beta in 0.0f64..2.0) {
        let mut layer = ParamMap::new();
        layer.insert("w", members[0].clone());
        for fuser in [&DifferentialFuser::new(beta).unwrap() as &dyn LayerFuser, &AnchorFuser, &MeanFuser] {
            prop_assert_eq!(fuse_layers(fuser, std::slice::from_ref(&layer)).unwrap(), layer.clone());
        }
    }

    #[test]
    fn beta_one_on_a_pair_gives_the_second_layer(a in prop::collection::vec(-10.0f32..10.0, 6), b in prop::collection::vec(-10.0f32..10.0, 6)) {
        let (a, b) = (HostTensor::new(vec![2, 3], a).unwrap(), HostTensor::new(vec![2, 3], b).unwrap());
        let fused = DifferentialFuser::new(1.0).unwrap().fuse_tensor("t", &[&a, &b]).unwrap();
        for (x, y) in fused.values().iter().zip(b.values()) {
            prop_assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0));
        }
    }

    #[test]
    fn mean_fusion_is_the_independent_mean(members in tensor_strategy()) {
        let refs: Vec<&HostTensor> = members.iter().collect();
        let fused = MeanFuser.fuse_tensor("t", &refs).unwrap();
        for (i, v) in fused.values().iter().enumerate() {
            let mean = members.iter().map(|t| f64::from(t.values()[i])).sum::<f64>() / members.len() as f64;
            prop_assert!((f64::from(*v) - mean).abs() <= 1e-5 * mean.abs().max(1.0));
        }
    }

    #[test]
    fn schedules_grow_end_at_l_and_spend_the_budget(
        layers in 1usize..80,
        start in 1usize..10,
        growth in 1.1f64..4.0,
        extra in 0usize..50,
    ) {
        let scheduler = GeometricScheduler::new(start, growth).unwrap();
        let stages = scheduler.capacities(layers).len();
        let budget = stages + extra;
        let plan = scheduler.plan(layers, budget).unwrap();
        prop_assert!(plan.windows(2).all(|w| w[0].capacity <= w[1].capacity));
        prop_assert_eq!(plan.last().unwrap().capacity, layers);
        prop_assert_eq!(plan.iter().map(|s| s.rounds).sum::<usize>(), budget);
        prop_assert!(plan.iter().all(|s| s.rounds >= 1));
    }
}

#[test]
fn k_equal_to_l_fusion_and_transfer_leave_the_model_unchanged() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let grouping = SpectralGrouper::new()
        .group(&model, model.num_layers())
        .unwrap();
    assert_eq!(grouping, Grouping::singletons(8));
    let submodel = build_submodel(&model, &grouping, &DifferentialFuser::default()).unwrap();
    assert_eq!(submodel.base_params(), model.base_params());
    assert_eq!(submodel.lora_params(), model.lora_params());
    let mut back = model.clone();
    transfer_lora(&mut back, &submodel, &grouping).unwrap();
    assert_eq!(back.lora_params(), model.lora_params());
}

#[test]
fn transfer_copies_each_fused_adapter_to_its_whole_group() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let mut model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let grouping = Grouping::new(vec![vec![0, 3, 5], vec![1, 2], vec![4, 6, 7]], 8).unwrap();
    let submodel = build_submodel(&model, &grouping, &DifferentialFuser::default()).unwrap();
    transfer_lora(&mut model, &submodel, &grouping).unwrap();
    for (g, group) in grouping.groups().iter().enumerate() {
        let fused = submodel.layers[g].lora_params();
        for &l in group {
            assert_eq!(model.layers[l].lora_params(), fused, "layer {l}");
        }
    }
}

#[test]
fn invalid_requests_are_typed_errors() {
    let n = LayerCount(8);
    for k in [0, 9] {
        assert!(matches!(
            EvenGrouper.group(&n, k),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            RandomGrouper::new(0).group(&n, k),
            Err(Error::InvalidArgument(_))
        ));
    }
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    assert!(matches!(
        SpectralGrouper::new().group(&model, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        SpectralGrouper::new().group(&model, 9),
        Err(Error::InvalidArgument(_))
    ));

    for beta in [-0.1, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            DifferentialFuser::new(beta),
            Err(Error::InvalidArgument(_))
        ));
    }

    let mut a = ParamMap::new();
    a.insert("w", HostTensor::zeros(vec![2, 3]));
    let mut b = ParamMap::new();
    b.insert("w", HostTensor::zeros(vec![3, 2]));
    let err = fuse_layers(&DifferentialFuser::default(), &[a.clone(), b]).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name == "w"),
        "{err}"
    );
    let mut c = a.clone();
    c.insert("extra", HostTensor::zeros(vec![1]));
    assert!(matches!(
        fuse_layers(&MeanFuser, &[a, c]),
        Err(Error::UnexpectedTensor { .. })
    ));

    assert!(matches!(
        GeometricScheduler::default().plan(32, 3),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ExplicitScheduler::capacities(vec![2, 4, 8]).plan(8, 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ExplicitScheduler::stages(&[
            Stage {
                capacity: 4,
                rounds: 2
            },
            Stage {
                capacity: 6,
                rounds: 2
            }
        ])
        .plan(8, 4),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        GeometricScheduler::new(0, 2.0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        GeometricScheduler::new(4, 1.0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn layers_of_mismatched_shapes_cannot_be_compared() {
    struct Mismatched;
    impl LayerSource for Mismatched {
        fn num_layers(&self) -> usize {
            3
        }
        fn effective_weight(&self, layer: usize, _: Projection) -> devft::Result<HostTensor> {
            Ok(HostTensor::new(
                vec![1, 2 + usize::from(layer == 2)],
                vec![1.0; 2 + usize::from(layer == 2)],
            )
            .unwrap())
        }
    }
    let err = layer_similarity(&Mismatched).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name.starts_with("layers.2.")),
        "{err}"
    );
}
