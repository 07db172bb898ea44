//! Coordinate-wise median (Yin et al., 2018), as Flower's `FedMedian`.

use crate::aggregate::{Aggregator, ClientUpdate, check_updates, per_coordinate};
use crate::error::Result;
use crate::params::ParamMap;

/// For every coordinate, the median of the clients' values, unweighted (example counts are
/// ignored). With an even number of updates it is the mean of the two middle values, as
/// numpy's `np.median`, which Flower 1.42's `FedMedian` applies
/// (`flwr/server/strategy/aggregate.py`, `aggregate_median`). Values are taken in f64 and
/// rounded to f32 once. No server state.
///
/// ```text
/// x[i] = median_k w_k[i]        (mean of the two middle values for an even count)
/// ```
///
/// # Example
///
/// ```
/// use devft::aggregate::{Aggregator, ClientUpdate, FedMedian};
/// use devft::{HostTensor, ParamMap};
///
/// let map = |v: f32| {
///     let mut params = ParamMap::new();
///     params.insert("w", HostTensor::new(vec![1], vec![v]).unwrap());
///     params
/// };
/// let update = |client, v, n| ClientUpdate { client, params: map(v), num_examples: n, metrics: Default::default() };
/// let updates = [update(0, 1.0, 100), update(1, 9.0, 1), update(2, 2.0, 1), update(3, 4.0, 1)];
/// // Sorted 1, 2, 4, 9: the mean of the middle two, whatever the example counts.
/// let new = FedMedian.aggregate(&map(0.0), &updates)?;
/// assert_eq!(new.get("w").unwrap().values(), &[3.0]);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FedMedian;

/// The median of `column`, which it sorts; the mean of the two middle values for an even
/// length. `column` must not be empty.
pub(crate) fn median_sorting(column: &mut [f64]) -> f64 {
    column.sort_by(f64::total_cmp);
    let n = column.len();
    if n % 2 == 1 {
        column[n / 2]
    } else {
        (column[n / 2 - 1] + column[n / 2]) / 2.0
    }
}

impl Aggregator for FedMedian {
    fn name(&self) -> String {
        "fedmedian".into()
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        check_updates(global, updates)?;
        let all: Vec<&ClientUpdate> = updates.iter().collect();
        per_coordinate(global, &all, median_sorting)
    }
}
