//! Submodel fidelity on the tiny fixture, against submodels fused and scored by hand.

mod common;

use common::*;
use devft::data::TokenizedExample;
use devft::fidelity::{FidelityCase, fidelity_sweep, submodel_loss};
use devft::fusion::{AnchorFuser, DifferentialFuser, MeanFuser};
use devft::grouping::{EvenGrouper, Grouping, LayerCount, LayerGrouper};
use devft::model::{CausalLm, DecoderLayer};
use devft::{Error, HostTensor, ParamMap};

fn tiny_model() -> CausalLm {
    CausalLm::load(tiny_llama_dir(), &device()).unwrap()
}

fn eval_examples() -> Vec<TokenizedExample> {
    tiny_federated_data().1.into_iter().take(6).collect()
}

/// Mean next-token cross-entropy over the target tokens, one example at a time, with the
/// log-softmax written out in f64.
fn loss_by_hand(model: &CausalLm, examples: &[TokenizedExample]) -> f64 {
    let (mut total, mut count) = (0.0, 0usize);
    for example in examples {
        let logits = values(model.forward(id_tensor(&example.ids, &device())));
        let vocab = logits.len() / example.ids.len();
        for t in 0..example.ids.len() - 1 {
            if !example.targets[t + 1] {
                continue;
            }
            let row: Vec<f64> = logits[t * vocab..(t + 1) * vocab]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            total += log_sum - row[example.ids[t + 1] as usize];
            count += 1;
        }
    }
    total / count as f64
}

/// `anchor + beta * sum_j (member_j - anchor)` for every tensor of the group's layers.
fn fuse_by_hand(model: &CausalLm, group: &[usize], beta: f64) -> DecoderLayer {
    let layers: Vec<ParamMap> = group.iter().map(|&l| model.layers[l].params()).collect();
    let mut fused = ParamMap::new();
    for (name, anchor) in layers[0].iter() {
        let values = (0..anchor.len())
            .map(|i| {
                let a = f64::from(anchor.values()[i]);
                let spread: f64 = layers[1..]
                    .iter()
                    .map(|layer| f64::from(layer.get(name).unwrap().values()[i]) - a)
                    .sum();
                (a + beta * spread) as f32
            })
            .collect();
        fused.insert(
            name,
            HostTensor::new(anchor.shape().to_vec(), values).unwrap(),
        );
    }
    DecoderLayer::from_all_params(model.config(), &fused, None, &device()).unwrap()
}

#[test]
fn submodel_loss_is_the_loss_of_the_hand_fused_submodel() {
    let model = tiny_model();
    let examples = eval_examples();
    let groups = vec![vec![0, 3], vec![1, 2], vec![4], vec![5, 6, 7]];
    let grouping = Grouping::new(groups.clone(), 8).unwrap();
    let fuser = DifferentialFuser::new(0.2).unwrap();

    let measured = submodel_loss(&model, &grouping, &fuser, &examples, 4, 0).unwrap();

    let by_hand = model
        .with_layers(
            groups
                .iter()
                .map(|g| fuse_by_hand(&model, g, 0.2))
                .collect(),
        )
        .unwrap();
    let expected = loss_by_hand(&by_hand, &examples);
    assert!(
        (measured - expected).abs() < 1e-6,
        "measured {measured}, by hand {expected}"
    );
    // Both alternatives are far outside that tolerance: the full model, and the same groups
    // fused with another beta.
    let full = loss_by_hand(&model, &examples);
    let other_beta = submodel_loss(
        &model,
        &grouping,
        &DifferentialFuser::new(0.4).unwrap(),
        &examples,
        4,
        0,
    )
    .unwrap();
    assert!((measured - full).abs() > 1e-4, "{measured} vs {full}");
    assert!(
        (measured - other_beta).abs() > 1e-4,
        "{measured} vs {other_beta}"
    );
}

#[test]
fn a_sweep_reports_every_submodel_and_the_full_model() {
    let model = tiny_model();
    let examples = eval_examples();
    let case = FidelityCase::new(&[2, 8], 3, 0)
        .with_grouper("even", &EvenGrouper)
        .with_fuser("anchor", &AnchorFuser)
        .with_fuser("mean", &MeanFuser);
    let mut seen = 0;
    let report = fidelity_sweep(&model, &examples, &case, |_| seen += 1).unwrap();

    let full = loss_by_hand(&model, &examples);
    assert!((report.full_loss - full).abs() < 1e-5);
    assert_eq!((report.num_layers, report.points.len(), seen), (8, 4, 4));
    let even_two = EvenGrouper.group(&LayerCount(8), 2).unwrap();
    let [anchor2, mean2, anchor8, mean8] = &report.points[..] else {
        unreachable!()
    };
    assert_eq!((anchor2.capacity, anchor2.fuser.as_str()), (2, "anchor"));
    assert_eq!((mean8.capacity, mean8.fuser.as_str()), (8, "mean"));
    assert_eq!(anchor2.groups, even_two.groups());
    assert_eq!(anchor8.groups, (0..8).map(|l| vec![l]).collect::<Vec<_>>());

    // The anchor fuser keeps each group's first layer: layers 0 and 4 of the even split.
    let anchors = model
        .with_layers(vec![model.layers[0].clone(), model.layers[4].clone()])
        .unwrap();
    assert!((anchor2.loss - loss_by_hand(&anchors, &examples)).abs() < 1e-5);
    let means = model
        .with_layers(
            even_two
                .groups()
                .iter()
                .map(|g| fuse_by_hand(&model, g, 1.0 / g.len() as f64))
                .collect(),
        )
        .unwrap();
    // The mean of n layers is the differential fusion with beta = 1/n.
    assert!((mean2.loss - loss_by_hand(&means, &examples)).abs() < 1e-5);
    assert_eq!(
        (anchor8.loss, mean8.loss),
        (report.full_loss, report.full_loss)
    );

    assert_eq!(
        report.smallest_within("even", "mean", f64::INFINITY),
        Some(2)
    );
    assert_eq!(report.smallest_within("even", "mean", 0.0), Some(8));
    assert_eq!(report.smallest_within("spectral", "mean", 1.0), None);
}

#[test]
fn a_sweep_refuses_impossible_capacities_and_empty_cases() {
    let model = tiny_model();
    let examples = eval_examples();
    for capacities in [&[0usize][..], &[9], &[]] {
        let case = FidelityCase::new(capacities, 4, 0)
            .with_grouper("even", &EvenGrouper)
            .with_fuser("mean", &MeanFuser);
        let err = fidelity_sweep(&model, &examples, &case, |_| {}).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    let no_fuser = FidelityCase::new(&[2], 4, 0).with_grouper("even", &EvenGrouper);
    let err = fidelity_sweep(&model, &examples, &no_fuser, |_| {}).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = fidelity_sweep(
        &model,
        &[],
        &FidelityCase::new(&[2], 4, 0)
            .with_grouper("even", &EvenGrouper)
            .with_fuser("mean", &MeanFuser),
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}
