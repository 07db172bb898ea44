//! Deconfliction-guided layer grouping (DGLG): spectral clustering of the layer-similarity
//! graph (DESIGN section 1.1, step 2).
//!
//! The eigenvectors of the unnormalised Laplacian `L = D - W` for the K smallest eigenvalues
//! give each layer a K-dimensional embedding (row l of the `L x K` eigenvector matrix, not
//! re-normalised); seeded k-means on the rows gives the groups. Layers whose updates point in
//! the same direction land together, so fusing them mixes little conflicting knowledge.

use serde::Serialize;

use crate::error::Result;
use crate::grouping::kmeans::KMeans;
use crate::grouping::similarity::{LayerSimilarity, layer_similarity, symmetric_eigen};
use crate::grouping::{Grouping, LayerGrouper, LayerSource, check_group_count};

/// The paper's grouping: spectral embedding of the layer-similarity graph, then k-means.
///
/// Defaults: 10 k-means restarts, seed 0 (scikit-learn's `n_init=10, random_state=0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpectralGrouper {
    restarts: usize,
    seed: u64,
}

impl Default for SpectralGrouper {
    fn default() -> Self {
        Self::new()
    }
}

/// Every intermediate of one spectral grouping, for inspection (the `plan` example prints it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpectralGrouping {
    /// All Laplacian eigenvalues, ascending.
    pub eigenvalues: Vec<f64>,
    /// Row l: layer l's spectral embedding (K columns).
    pub embedding: Vec<Vec<f64>>,
    /// The resulting groups.
    pub groups: Vec<Vec<usize>>,
}

impl SpectralGrouper {
    /// 10 restarts, seed 0.
    pub fn new() -> Self {
        Self {
            restarts: 10,
            seed: 0,
        }
    }

    /// Sets the k-means seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the number of k-means restarts (at least one is run).
    pub fn with_restarts(mut self, restarts: usize) -> Self {
        self.restarts = restarts.max(1);
        self
    }

    /// Groups layers from an already computed similarity graph.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] unless `1 <= k <= L`.
    pub fn group_similarity(
        &self,
        similarity: &LayerSimilarity,
        k: usize,
    ) -> Result<(Grouping, SpectralGrouping)> {
        let n = similarity.laplacian.len();
        check_group_count(k, n)?;
        let (eigenvalues, vectors) = symmetric_eigen(&similarity.laplacian);
        let embedding: Vec<Vec<f64>> = vectors.iter().map(|row| row[..k].to_vec()).collect();
        let kmeans = KMeans {
            n_init: self.restarts,
            seed: self.seed,
            ..KMeans::new(k)
        };
        let grouping = Grouping::from_labels(&kmeans.fit(&embedding)?.labels);
        let details = SpectralGrouping {
            eigenvalues,
            embedding,
            groups: grouping.groups().to_vec(),
        };
        Ok((grouping, details))
    }
}

impl LayerGrouper for SpectralGrouper {
    fn group(&self, layers: &dyn LayerSource, k: usize) -> Result<Grouping> {
        check_group_count(k, layers.num_layers())?;
        Ok(self.group_similarity(&layer_similarity(layers)?, k)?.0)
    }
}
