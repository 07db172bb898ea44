//! Contiguous, equal-size groups: the paper's "even grouping" ablation.

use crate::error::Result;
use crate::grouping::{Grouping, LayerGrouper, LayerSource, check_group_count};

/// Splits layers `0..L` into K contiguous runs whose sizes differ by at most one (the first
/// `L mod K` runs are one longer).
///
/// ```
/// use devft::grouping::{EvenGrouper, LayerCount, LayerGrouper};
///
/// let grouping = EvenGrouper.group(&LayerCount(7), 3)?;
/// assert_eq!(grouping.groups(), &[vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct EvenGrouper;

/// Sizes of `k` near-equal parts of `n`, larger parts first.
pub(crate) fn even_sizes(n: usize, k: usize) -> Vec<usize> {
    (0..k).map(|g| n / k + usize::from(g < n % k)).collect()
}

impl LayerGrouper for EvenGrouper {
    fn group(&self, layers: &dyn LayerSource, k: usize) -> Result<Grouping> {
        let n = layers.num_layers();
        check_group_count(k, n)?;
        let mut start = 0;
        let groups = even_sizes(n, k)
            .into_iter()
            .map(|size| {
                let group = (start..start + size).collect();
                start += size;
                group
            })
            .collect();
        Grouping::new(groups, n)
    }
}
