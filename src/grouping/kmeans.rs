//! Seeded k-means (Lloyd's algorithm, k-means++ seeding, several restarts), as scikit-learn's
//! `KMeans` runs it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// k-means settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeans {
    /// Number of clusters.
    pub k: usize,
    /// Independent restarts; the lowest-inertia result wins. Default: 10.
    pub n_init: usize,
    /// Lloyd iterations per restart. Default: 300.
    pub max_iter: usize,
    /// RNG seed. Default: 0.
    pub seed: u64,
}

/// A clustering.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansResult {
    /// Cluster of each point, in `0..k`; every cluster is non-empty.
    pub labels: Vec<usize>,
    /// Cluster centres.
    pub centers: Vec<Vec<f64>>,
    /// Sum of squared distances of points to their centre.
    pub inertia: f64,
}

fn distance2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

impl KMeans {
    /// `k` clusters with the default restarts, iterations and seed.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            n_init: 10,
            max_iter: 300,
            seed: 0,
        }
    }

    /// Clusters `points` (all of one dimension).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `k` is 0 or exceeds the number of points, or a point
    /// holds a non-finite value.
    pub fn fit(&self, points: &[Vec<f64>]) -> Result<KMeansResult> {
        let n = points.len();
        if self.k == 0 || self.k > n {
            return Err(Error::InvalidArgument(format!(
                "k-means needs 1 <= k <= {n} points, got k = {}",
                self.k
            )));
        }
        if points.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument("k-means input is not finite".into()));
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut best: Option<KMeansResult> = None;
        for _ in 0..self.n_init.max(1) {
            let result = self.run_once(points, &mut rng);
            if best.as_ref().is_none_or(|b| result.inertia < b.inertia) {
                best = Some(result);
            }
        }
        Ok(best.expect("at least one restart"))
    }

    fn run_once(&self, points: &[Vec<f64>], rng: &mut StdRng) -> KMeansResult {
        let mut centers = plus_plus_seeds(points, self.k, rng);
        let mut labels = vec![0; points.len()];
        for _ in 0..self.max_iter {
            let changed = assign(points, &centers, &mut labels);
            ensure_non_empty(points, &mut centers, &mut labels, self.k);
            centers = centroids(points, &labels, self.k);
            if !changed {
                break;
            }
        }
        assign(points, &centers, &mut labels);
        ensure_non_empty(points, &mut centers, &mut labels, self.k);
        let centers = centroids(points, &labels, self.k);
        let inertia = points
            .iter()
            .zip(&labels)
            .map(|(p, &l)| distance2(p, &centers[l]))
            .sum();
        KMeansResult {
            labels,
            centers,
            inertia,
        }
    }
}

/// k-means++: the first centre uniformly, each next one with probability proportional to the
/// squared distance to the nearest centre chosen so far.
fn plus_plus_seeds(points: &[Vec<f64>], k: usize, rng: &mut StdRng) -> Vec<Vec<f64>> {
    let mut centers = vec![points[rng.random_range(0..points.len())].clone()];
    while centers.len() < k {
        let d2: Vec<f64> = points
            .iter()
            .map(|p| {
                centers
                    .iter()
                    .map(|c| distance2(p, c))
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let total: f64 = d2.iter().sum();
        let next = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            d2.iter()
                .position(|&d| {
                    target -= d;
                    target <= 0.0 && d > 0.0
                })
                .unwrap_or_else(|| d2.iter().rposition(|&d| d > 0.0).unwrap_or(0))
        } else {
            rng.random_range(0..points.len())
        };
        centers.push(points[next].clone());
    }
    centers
}

/// Assigns each point to its nearest centre; returns whether any label changed.
fn assign(points: &[Vec<f64>], centers: &[Vec<f64>], labels: &mut [usize]) -> bool {
    let mut changed = false;
    for (point, label) in points.iter().zip(labels.iter_mut()) {
        let nearest = (0..centers.len())
            .min_by(|&a, &b| {
                distance2(point, &centers[a]).total_cmp(&distance2(point, &centers[b]))
            })
            .expect("k >= 1");
        changed |= nearest != *label;
        *label = nearest;
    }
    changed
}

/// Gives every empty cluster the point farthest from its current centre (taken from a
/// cluster with more than one point), so that exactly `k` clusters are non-empty even when
/// points coincide.
fn ensure_non_empty(points: &[Vec<f64>], centers: &mut [Vec<f64>], labels: &mut [usize], k: usize) {
    loop {
        let mut sizes = vec![0usize; k];
        for &l in labels.iter() {
            sizes[l] += 1;
        }
        let Some(empty) = sizes.iter().position(|&s| s == 0) else {
            return;
        };
        let donor = (0..points.len())
            .filter(|&i| sizes[labels[i]] > 1)
            .max_by(|&a, &b| {
                distance2(&points[a], &centers[labels[a]])
                    .total_cmp(&distance2(&points[b], &centers[labels[b]]))
            })
            .expect("k <= n leaves a cluster with two points");
        labels[donor] = empty;
        centers[empty] = points[donor].clone();
    }
}

fn centroids(points: &[Vec<f64>], labels: &[usize], k: usize) -> Vec<Vec<f64>> {
    let dim = points[0].len();
    let mut sums = vec![vec![0.0; dim]; k];
    let mut counts = vec![0usize; k];
    for (p, &l) in points.iter().zip(labels) {
        counts[l] += 1;
        for (s, v) in sums[l].iter_mut().zip(p) {
            *s += v;
        }
    }
    for (s, &c) in sums.iter_mut().zip(&counts) {
        for v in s.iter_mut() {
            *v /= c.max(1) as f64;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_obvious_clusters() {
        let points: Vec<Vec<f64>> = [0.0, 0.1, 0.2, 10.0, 10.1, 20.0]
            .iter()
            .map(|&x| vec![x])
            .collect();
        let result = KMeans::new(3).fit(&points).unwrap();
        let l = &result.labels;
        assert_eq!(l[0], l[1]);
        assert_eq!(l[1], l[2]);
        assert_eq!(l[3], l[4]);
        assert!(l[0] != l[3] && l[3] != l[5] && l[0] != l[5]);
    }

    #[test]
    fn identical_points_still_fill_every_cluster() {
        let points = vec![vec![1.0, 1.0]; 5];
        let result = KMeans::new(4).fit(&points).unwrap();
        let mut seen = result.labels.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4);
    }
}
