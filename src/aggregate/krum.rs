//! Krum and Multi-Krum (Blanchard et al., 2017), as Flower's `aggregate_krum`.

use crate::aggregate::{Aggregator, ClientUpdate, check_updates, weighted_mean};
use crate::error::{Error, Result};
use crate::params::ParamMap;

/// Byzantine-robust selection. With `f` assumed malicious clients among `n`, each update's
/// score is the sum of its squared L2 distances (over all tensors together) to its
/// `max(1, n - f - 2)` nearest other updates. Krum (`keep = 0`) returns the update with the
/// lowest score; Multi-Krum (`keep = m`) returns the example-weighted mean of the `m` lowest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Krum {
    num_malicious: usize,
    keep: usize,
}

impl Krum {
    /// Krum for `num_malicious` assumed attackers.
    pub fn new(num_malicious: usize) -> Self {
        Self {
            num_malicious,
            keep: 0,
        }
    }

    /// Multi-Krum keeping the `keep` best-scored updates (`0` means plain Krum).
    pub fn multi(num_malicious: usize, keep: usize) -> Self {
        Self {
            num_malicious,
            keep,
        }
    }
}

/// The squared L2 distance between two maps with the same names and shapes (checked by the
/// caller), over all tensors together, accumulated in f64.
fn squared_distance(a: &ParamMap, b: &ParamMap) -> f64 {
    a.iter()
        .map(|(name, x)| {
            let y = b.get(name).expect("checked names");
            x.values()
                .iter()
                .zip(y.values())
                .map(|(p, q)| (f64::from(*p) - f64::from(*q)).powi(2))
                .sum::<f64>()
        })
        .sum()
}

/// `D[i][j]`: the squared L2 distance between the parameters of checked updates `i` and `j`
/// (Flower's `_compute_distances`).
pub(crate) fn distance_matrix(updates: &[ClientUpdate]) -> Vec<Vec<f64>> {
    let n = updates.len();
    let mut distances = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let d = squared_distance(&updates[i].params, &updates[j].params);
            distances[i][j] = d;
            distances[j][i] = d;
        }
    }
    distances
}

/// The positions in `candidates` (indices into `distances`) ordered by Krum score, best
/// first, ties in candidate order (so the first is Flower's `np.argmin`). Each candidate's
/// score sums its `max(1, n - num_malicious - 2)` smallest distances to the other candidates,
/// `n = candidates.len()`.
pub(crate) fn krum_order(
    distances: &[Vec<f64>],
    candidates: &[usize],
    num_malicious: usize,
) -> Vec<usize> {
    let n = candidates.len();
    let neighbours = n.saturating_sub(num_malicious.saturating_add(2)).max(1);
    let scores: Vec<f64> = candidates
        .iter()
        .map(|&i| {
            let mut others: Vec<f64> = candidates
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| distances[i][j])
                .collect();
            others.sort_by(f64::total_cmp);
            others.iter().take(neighbours).sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    order
}

impl Aggregator for Krum {
    fn name(&self) -> String {
        format!("krum(f={}, keep={})", self.num_malicious, self.keep)
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        check_updates(global, updates)?;
        let n = updates.len();
        if self.keep > n {
            return Err(Error::InvalidArgument(format!(
                "Multi-Krum cannot keep {} of {n} updates",
                self.keep
            )));
        }
        let all: Vec<usize> = (0..n).collect();
        let order = krum_order(&distance_matrix(updates), &all, self.num_malicious);
        if self.keep == 0 {
            return Ok(updates[order[0]].params.clone());
        }
        let kept: Vec<ClientUpdate> = order[..self.keep]
            .iter()
            .map(|&i| updates[i].clone())
            .collect();
        weighted_mean(global, &kept)
    }
}
