//! Layer grouping: partitions of a model's decoder layers into K groups (DESIGN section 1.1,
//! step 2).
//!
//! [`LayerGrouper`] is the seam: the paper's deconfliction-guided grouping
//! ([`SpectralGrouper`]) and the ablations ([`EvenGrouper`], [`RandomGrouper`]) implement it,
//! and so can a user's own grouper. Groupers read layers through [`LayerSource`], which hands
//! out one layer's effective projection weight at a time, so a grouper never needs the whole
//! model in host memory.

mod even;
mod kmeans;
mod random;
mod similarity;
mod spectral;

pub use even::EvenGrouper;
pub use kmeans::{KMeans, KMeansResult};
pub use random::RandomGrouper;
pub use similarity::{LayerSimilarity, layer_similarity, symmetric_eigen};
pub use spectral::{SpectralGrouper, SpectralGrouping};

use crate::error::{Error, Result};
use crate::model::{CausalLm, Projection};
use crate::params::HostTensor;

/// An ordered partition of layer indices `0..L` into non-empty groups.
///
/// Each group is sorted; groups are ordered by their smallest member (the *anchor*), which is
/// the order of the fused layers in a submodel.
///
/// A deserialised grouping goes through [`Grouping::new`], so one read from a file is a
/// partition too (of `0..L`, `L` its number of members); whether it fits a given model is
/// the reader's check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "GroupingRepr")]
pub struct Grouping {
    groups: Vec<Vec<usize>>,
}

/// The serialised form of a [`Grouping`], validated on the way in.
#[derive(serde::Deserialize)]
struct GroupingRepr {
    groups: Vec<Vec<usize>>,
}

impl TryFrom<GroupingRepr> for Grouping {
    type Error = Error;

    fn try_from(repr: GroupingRepr) -> Result<Self> {
        let num_layers = repr.groups.iter().map(Vec::len).sum();
        Self::new(repr.groups, num_layers)
    }
}

impl Grouping {
    /// Validates and normalises `groups` as a partition of `0..num_layers`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when a group is empty, or a layer is missing, repeated or out
    /// of range.
    pub fn new(mut groups: Vec<Vec<usize>>, num_layers: usize) -> Result<Self> {
        let mut seen = vec![false; num_layers];
        for group in &mut groups {
            if group.is_empty() {
                return Err(Error::InvalidArgument("a group is empty".into()));
            }
            group.sort_unstable();
            for &layer in group.iter() {
                match seen.get_mut(layer) {
                    None => {
                        return Err(Error::InvalidArgument(format!(
                            "layer {layer} is out of range (model has {num_layers} layers)"
                        )));
                    }
                    Some(true) => {
                        return Err(Error::InvalidArgument(format!(
                            "layer {layer} appears in two groups"
                        )));
                    }
                    Some(slot) => *slot = true,
                }
            }
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(Error::InvalidArgument(format!(
                "layer {missing} is in no group"
            )));
        }
        groups.sort_by_key(|g| g[0]);
        Ok(Self { groups })
    }

    /// The grouping given by one cluster label per layer.
    pub fn from_labels(labels: &[usize]) -> Self {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut label_to_group = std::collections::BTreeMap::new();
        for (layer, label) in labels.iter().enumerate() {
            let index = *label_to_group.entry(label).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[index].push(layer);
        }
        Self::new(groups, labels.len()).expect("labels define a partition")
    }

    /// Every layer on its own (`K = L`).
    pub fn singletons(num_layers: usize) -> Self {
        Self {
            groups: (0..num_layers).map(|l| vec![l]).collect(),
        }
    }

    /// The groups, ordered by anchor.
    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// The number of groups K.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether there is no group (only for a model without layers).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The number of layers partitioned.
    pub fn num_layers(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }

    /// The index of the group holding `layer`.
    pub fn group_of(&self, layer: usize) -> Option<usize> {
        self.groups.iter().position(|g| g.contains(&layer))
    }
}

/// Read access to a model's decoder layers, one tensor at a time.
pub trait LayerSource {
    /// The number of decoder layers.
    fn num_layers(&self) -> usize;

    /// The effective weight `W + (alpha / r) B A` of `projection` in `layer`, in PyTorch's
    /// `[out, in]` layout (just `W` where the projection has no adapter).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a layer out of range; source-specific errors otherwise.
    fn effective_weight(&self, layer: usize, projection: Projection) -> Result<HostTensor>;
}

impl LayerSource for CausalLm {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn effective_weight(&self, layer: usize, projection: Projection) -> Result<HostTensor> {
        let decoder = self.layers.get(layer).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {layer} is out of range (model has {} layers)",
                self.layers.len()
            ))
        })?;
        let weight = decoder
            .projection(projection)
            .effective_weight(&self.device());
        Ok(HostTensor::from_tensor(weight.transpose()))
    }
}

/// Chooses K groups of layers.
///
/// # Example
///
/// A user-defined grouper that pairs neighbouring layers regardless of K's value would still
/// have to return exactly K groups; here one that puts the first `L - K + 1` layers together:
///
/// ```
/// use devft::grouping::{Grouping, LayerGrouper, LayerSource, check_group_count};
///
/// struct HeadHeavy;
///
/// impl LayerGrouper for HeadHeavy {
///     fn group(&self, layers: &dyn LayerSource, k: usize) -> devft::Result<Grouping> {
///         let n = layers.num_layers();
///         check_group_count(k, n)?;
///         let mut groups = vec![(0..n - k + 1).collect::<Vec<_>>()];
///         groups.extend((n - k + 1..n).map(|l| vec![l]));
///         Grouping::new(groups, n)
///     }
/// }
///
/// let grouping = HeadHeavy.group(&devft::grouping::LayerCount(6), 3)?;
/// assert_eq!(grouping.groups(), &[vec![0, 1, 2, 3], vec![4], vec![5]]);
/// # Ok::<(), devft::Error>(())
/// ```
pub trait LayerGrouper: Send {
    /// Partitions the layers of `layers` into exactly `k` groups.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `k` is 0 or greater than the number of layers, and any
    /// error of the source.
    fn group(&self, layers: &dyn LayerSource, k: usize) -> Result<Grouping>;
}

/// A [`LayerSource`] that only knows how many layers there are, for groupers that look at
/// nothing else (even, random). Asking it for a weight is an error.
#[derive(Debug, Clone, Copy)]
pub struct LayerCount(pub usize);

impl LayerSource for LayerCount {
    fn num_layers(&self) -> usize {
        self.0
    }

    fn effective_weight(&self, _: usize, _: Projection) -> Result<HostTensor> {
        Err(Error::InvalidArgument(
            "a LayerCount has no weights; pass the model itself".into(),
        ))
    }
}

/// Checks `1 <= k <= num_layers`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] otherwise.
pub fn check_group_count(k: usize, num_layers: usize) -> Result<()> {
    if k == 0 || k > num_layers {
        return Err(Error::InvalidArgument(format!(
            "cannot make {k} groups of {num_layers} layers (need 1 <= K <= {num_layers})"
        )));
    }
    Ok(())
}

/// Which grouping algorithm to use, for configs and command lines.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrouperKind {
    /// [`SpectralGrouper`] (the paper's DGLG).
    Spectral,
    /// [`EvenGrouper`] (contiguous, equal-size ablation).
    Even,
    /// [`RandomGrouper`] (random ablation).
    Random,
}

impl GrouperKind {
    /// The grouper, with `seed` for the randomised ones.
    pub fn build(self, seed: u64) -> Box<dyn LayerGrouper> {
        match self {
            GrouperKind::Spectral => Box::new(SpectralGrouper::new().with_seed(seed)),
            GrouperKind::Even => Box::new(EvenGrouper),
            GrouperKind::Random => Box::new(RandomGrouper::new(seed)),
        }
    }
}

impl std::str::FromStr for GrouperKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "spectral" => Ok(Self::Spectral),
            "even" => Ok(Self::Even),
            "random" => Ok(Self::Random),
            other => Err(Error::InvalidArgument(format!(
                "unknown grouper `{other}` (spectral, even, random)"
            ))),
        }
    }
}
