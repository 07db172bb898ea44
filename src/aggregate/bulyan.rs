//! Bulyan (El Mhamdi et al., 2018), as Flower's `Bulyan` strategy with its default Krum
//! first stage.

use crate::aggregate::fedmedian::median_sorting;
use crate::aggregate::krum::{distance_matrix, krum_order};
use crate::aggregate::{Aggregator, ClientUpdate, check_updates, per_coordinate};
use crate::error::{Error, Result};
use crate::params::ParamMap;

/// Byzantine-robust aggregation in two stages, for `f` assumed malicious clients among
/// `n >= 4f + 3` updates, as Flower 1.42's `aggregate_bulyan`
/// (`flwr/server/strategy/aggregate.py`, called by `flwr/server/strategy/bulyan.py`):
///
/// 1. **Selection.** `theta = n - 2f` times, run Krum ([`super::Krum`] with `f`, keeping
///    one) over the updates not yet selected and move its choice to the selected set. Each
///    run scores the `n'` remaining updates by their `max(1, n' - f - 2)` nearest squared
///    L2 distances (all tensors together); ties go to the earlier client.
/// 2. **Aggregation.** For every coordinate, take the median `med` of the `theta` selected
///    values (the mean of the two middle ones for an even count) and return the unweighted
///    mean of the `beta = theta - 2f` selected values closest to `med`.
///
/// ```text
/// S        = Krum applied theta = n - 2f times, without replacement
/// x[i]     = mean of the beta = n - 4f values w_k[i], k in S, closest to median_{k in S} w_k[i]
/// ```
///
/// Example counts are ignored. Flower's first stage is a pluggable rule, but
/// `aggregate_bulyan` accepts only `aggregate_krum` with `to_keep = 0` (Multi-Krum returns an
/// average that is not one of the updates, which Flower then fails to find), so Krum is the
/// rule here and `f` the one parameter. Where two different values lie at exactly the same
/// distance from the median and only one of them fits in `beta`, the smaller one is taken;
/// Flower leaves that choice to numpy's `argpartition`, whose pick depends on its kernel and
/// on the order of the values. With `f = 0` Bulyan is the unweighted mean. No server state.
///
/// # Example
///
/// ```
/// use devft::aggregate::{Aggregator, Bulyan, ClientUpdate};
/// use devft::{Error, HostTensor, ParamMap};
///
/// let map = |v: f32| {
///     let mut params = ParamMap::new();
///     params.insert("w", HostTensor::new(vec![1], vec![v]).unwrap());
///     params
/// };
/// let update = |client, v| ClientUpdate { client, params: map(v), num_examples: 1, metrics: Default::default() };
/// // Seven clients, one far off: f = 1 needs n >= 7.
/// let values = [1.0, 1.5, 3.0, 2.5, 6.0, 2.0, 40.0];
/// let updates: Vec<_> = values.iter().enumerate().map(|(c, &v)| update(c, v)).collect();
/// let new = Bulyan::new(1).aggregate(&map(0.0), &updates)?;
/// // Krum selects 2, 1.5, 2.5, 1 and 3 (never 6 or 40); their median 2 and its three
/// // nearest values 1.5, 2 and 2.5 average to 2 (Flower 1.42 gives 2 as well).
/// assert_eq!(new.get("w").unwrap().values(), &[2.0]);
/// // Six updates are too few for f = 1.
/// assert!(matches!(Bulyan::new(1).aggregate(&map(0.0), &updates[..6]), Err(Error::InvalidArgument(_))));
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulyan {
    num_malicious: usize,
}

impl Bulyan {
    /// Bulyan for `num_malicious` (`f`) assumed attackers; aggregation then needs at least
    /// `4f + 3` updates.
    pub fn new(num_malicious: usize) -> Self {
        Self { num_malicious }
    }

    /// The assumed number of malicious clients, `f`.
    pub fn num_malicious(&self) -> usize {
        self.num_malicious
    }
}

/// The mean of the `beta` values of `column` closest to its median (`beta <= column.len()`).
/// Sorts `column`.
fn mean_closest_to_median(column: &mut [f64], beta: usize) -> f64 {
    let med = median_sorting(column);
    // In a sorted column the `beta` values nearest to `med` form one contiguous run: grow it
    // from `med` outwards, taking the lower side on a tie.
    let n = column.len();
    let mut lo = column.partition_point(|&x| x < med);
    let mut hi = lo;
    while hi - lo < beta {
        let take_high = lo == 0 || (hi < n && column[hi] - med < med - column[lo - 1]);
        if take_high {
            hi += 1;
        } else {
            lo -= 1;
        }
    }
    column[lo..hi].iter().sum::<f64>() / beta as f64
}

impl Aggregator for Bulyan {
    fn name(&self) -> String {
        format!("bulyan(f={})", self.num_malicious)
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        check_updates(global, updates)?;
        let (n, f) = (updates.len(), self.num_malicious);
        let needed = f.saturating_mul(4).saturating_add(3);
        if n < needed {
            return Err(Error::InvalidArgument(format!(
                "Bulyan with f = {f} assumed malicious clients needs n >= 4f + 3 = {needed} \
                 updates, got n = {n}"
            )));
        }
        let theta = n - 2 * f;
        let beta = theta - 2 * f;
        let distances = distance_matrix(updates);
        let mut remaining: Vec<usize> = (0..n).collect();
        let mut selected = Vec::with_capacity(theta);
        for _ in 0..theta {
            let best = krum_order(&distances, &remaining, f)[0];
            selected.push(&updates[remaining.remove(best)]);
        }
        per_coordinate(global, &selected, |column| {
            mean_closest_to_median(column, beta)
        })
    }
}
