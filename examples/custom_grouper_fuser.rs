//! DevFT's traits are open: this program defines a grouper and a fuser outside the crate and
//! plugs them into submodel construction and knowledge transfer.
//!
//! - `NormBandGrouper` groups layers whose effective-weight norms are close (sorting by norm
//!   and cutting into K bands), a cheap alternative to spectral grouping.
//! - `TrimmedMeanFuser` averages each element over the group after dropping its largest and
//!   smallest value (a robust merge in the spirit of TIES/DARE).
//!
//! ```text
//! cargo run --release --example custom_grouper_fuser
//! ```

use std::process::ExitCode;

use devft::fusion::LayerFuser;
use devft::grouping::{Grouping, LayerGrouper, LayerSource, check_group_count};
use devft::model::{CausalLm, Projection, import_adapter};
use devft::transfer::{build_submodel, transfer_lora};
use devft::{HostTensor, Result};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");

struct NormBandGrouper;

impl LayerGrouper for NormBandGrouper {
    fn group(&self, layers: &dyn LayerSource, k: usize) -> Result<Grouping> {
        let n = layers.num_layers();
        check_group_count(k, n)?;
        let mut norms = Vec::with_capacity(n);
        for layer in 0..n {
            let mut sum = 0.0f64;
            for projection in Projection::ALL {
                let w = layers.effective_weight(layer, projection)?;
                sum += w
                    .values()
                    .iter()
                    .map(|v| f64::from(*v).powi(2))
                    .sum::<f64>();
            }
            norms.push((sum.sqrt(), layer));
        }
        norms.sort_by(|a, b| a.0.total_cmp(&b.0));
        let order: Vec<usize> = norms.into_iter().map(|(_, l)| l).collect();
        let groups = (0..k)
            .map(|g| order[g * n / k..(g + 1) * n / k].to_vec())
            .collect();
        Grouping::new(groups, n)
    }
}

struct TrimmedMeanFuser;

impl LayerFuser for TrimmedMeanFuser {
    fn fuse_tensor(&self, _name: &str, members: &[&HostTensor]) -> Result<HostTensor> {
        let values = (0..members[0].len())
            .map(|i| {
                let mut column: Vec<f32> = members.iter().map(|t| t.values()[i]).collect();
                column.sort_by(f32::total_cmp);
                let kept = if column.len() > 2 {
                    &column[1..column.len() - 1]
                } else {
                    &column[..]
                };
                kept.iter().sum::<f32>() / kept.len() as f32
            })
            .collect();
        HostTensor::new(members[0].shape().to_vec(), values)
    }
}

fn run() -> Result<()> {
    let device = devft::device::default_device()?;
    let model = CausalLm::load(FIXTURE, &device)?;
    let mut model = import_adapter(&model, format!("{FIXTURE}/adapter"))?;
    let grouping = NormBandGrouper.group(&model, 3)?;
    println!("norm-band groups: {:?}", grouping.groups());
    let submodel = build_submodel(&model, &grouping, &TrimmedMeanFuser)?;
    println!(
        "submodel: {} layers, {} adapter values (full model: {})",
        submodel.num_layers(),
        submodel.lora_params().num_values(),
        model.lora_params().num_values()
    );
    transfer_lora(&mut model, &submodel, &grouping)?;
    for (g, group) in grouping.groups().iter().enumerate() {
        let same = group
            .iter()
            .all(|&l| model.layers[l].lora_params() == submodel.layers[g].lora_params());
        println!("group {g} {group:?}: adapters transferred to every member: {same}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
