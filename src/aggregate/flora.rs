//! FLoRA (Wang et al., 2024): stacking the clients' LoRA pairs, so that the aggregate of the
//! products `B A` is exact.

use crate::aggregate::{Aggregator, ClientUpdate, check_updates, is_lora_a};
use crate::error::{Error, Result};
use crate::params::{HostTensor, ParamMap};

/// Stacks the clients' adapters along the rank: `A = [A_1; ...; A_K]` (`[K r, in]`) and
/// `B = [p_1 B_1, ..., p_K B_K]` (`[out, K r]`), with `p_k` the client's share of examples,
/// so that `B A = sum_k p_k B_k A_k` exactly (averaging `A` and `B` separately, as FedAvg
/// does, is not). The loop merges the stacked pair into the base weights
/// ([`Aggregator::merges_into_base`]) and clients start every round from a fresh adapter;
/// the downlink grows with the number of clients, the price of exactness.
///
/// ```
/// use devft::aggregate::{Aggregator, ClientUpdate, Flora};
/// use devft::{HostTensor, ParamMap};
///
/// // One projection with in = 1, out = 1, r = 1: B A is a scalar.
/// let update = |client, a: f32, b: f32, n| {
///     let mut params = ParamMap::new();
///     params.insert("p.lora_A.weight", HostTensor::new(vec![1, 1], vec![a]).unwrap());
///     params.insert("p.lora_B.weight", HostTensor::new(vec![1, 1], vec![b]).unwrap());
///     ClientUpdate { client, params, num_examples: n, metrics: Default::default() }
/// };
/// let global = update(9, 0.0, 0.0, 1).params;
/// let stacked = Flora.aggregate(&global, &[update(0, 2.0, 3.0, 1), update(1, 4.0, 5.0, 3)])?;
/// let a = stacked.get("p.lora_A.weight").unwrap();
/// let b = stacked.get("p.lora_B.weight").unwrap();
/// assert_eq!((a.shape(), b.shape()), (&[2, 1][..], &[1, 2][..]));
/// // B A = 0.25 * 3 * 2 + 0.75 * 5 * 4 = 16.5
/// let product: f32 = a.values().iter().zip(b.values()).map(|(x, y)| x * y).sum();
/// assert_eq!(product, 16.5);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Flora;

impl Aggregator for Flora {
    fn name(&self) -> String {
        "flora".into()
    }

    fn merges_into_base(&self) -> bool {
        true
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        check_updates(global, updates)?;
        let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
        let mut out = ParamMap::new();
        for (name, tensor) in global.iter() {
            let &[rows, cols] = tensor.shape() else {
                return Err(Error::InvalidAdapter(format!(
                    "FLoRA stacks matrices, but `{name}` has shape {:?}",
                    tensor.shape()
                )));
            };
            let parts = updates
                .iter()
                .map(|u| (u.params.require(name), u.num_examples as f64 / total));
            let stacked = if is_lora_a(name) {
                // [r, in] blocks, one under the other.
                let mut values = Vec::with_capacity(tensor.len() * updates.len());
                for (part, _) in parts {
                    values.extend_from_slice(part?.values());
                }
                HostTensor::new(vec![rows * updates.len(), cols], values)?
            } else {
                // [out, r] blocks, side by side, each scaled by its client's share.
                let (d_out, r) = (rows, cols);
                let parts = parts
                    .map(|(part, share)| part.map(|p| (p, share as f32)))
                    .collect::<Result<Vec<_>>>()?;
                let mut values = Vec::with_capacity(tensor.len() * updates.len());
                for row in 0..d_out {
                    for (part, share) in &parts {
                        let block = &part.values()[row * r..(row + 1) * r];
                        values.extend(block.iter().map(|v| v * share));
                    }
                }
                HostTensor::new(vec![d_out, r * updates.len()], values)?
            };
            out.insert(name, stacked);
        }
        Ok(out)
    }
}
