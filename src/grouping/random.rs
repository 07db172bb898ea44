//! Random groups: the paper's "random grouping" ablation.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::error::Result;
use crate::grouping::even::even_sizes;
use crate::grouping::{Grouping, LayerGrouper, LayerSource, check_group_count};

/// Shuffles the layers with a seeded RNG and cuts them into K groups of near-equal size, so
/// that random and even grouping differ only in which layers share a group.
///
/// ```
/// use devft::grouping::{LayerCount, LayerGrouper, RandomGrouper};
///
/// let a = RandomGrouper::new(7).group(&LayerCount(12), 4)?;
/// let b = RandomGrouper::new(7).group(&LayerCount(12), 4)?;
/// assert_eq!(a, b);
/// assert_eq!(a.len(), 4);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RandomGrouper {
    seed: u64,
}

impl RandomGrouper {
    /// A grouper drawing from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }
}

impl LayerGrouper for RandomGrouper {
    fn group(&self, layers: &dyn LayerSource, k: usize) -> Result<Grouping> {
        let n = layers.num_layers();
        check_group_count(k, n)?;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(self.seed));
        let mut rest = order.as_slice();
        let groups = even_sizes(n, k)
            .into_iter()
            .map(|size| {
                let (group, tail) = rest.split_at(size);
                rest = tail;
                group.to_vec()
            })
            .collect();
        Grouping::new(groups, n)
    }
}
