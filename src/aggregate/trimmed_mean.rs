//! Coordinate-wise trimmed mean (Yin et al., 2018), as Flower's `FedTrimmedAvg`.

use crate::aggregate::{Aggregator, ClientUpdate, check_updates};
use crate::error::{Error, Result};
use crate::params::{HostTensor, ParamMap};

/// For every coordinate, drops the `floor(beta * n)` smallest and largest client values and
/// averages the rest (unweighted). Default `beta = 0.2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimmedMean {
    beta: f64,
}

impl Default for TrimmedMean {
    fn default() -> Self {
        Self { beta: 0.2 }
    }
}

impl TrimmedMean {
    /// Trims a fraction `beta` from each end.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `0 <= beta < 0.5`.
    pub fn new(beta: f64) -> Result<Self> {
        if !(0.0..0.5).contains(&beta) {
            return Err(Error::InvalidArgument(format!(
                "trim fraction must lie in [0, 0.5), got {beta}"
            )));
        }
        Ok(Self { beta })
    }
}

impl Aggregator for TrimmedMean {
    fn name(&self) -> String {
        format!("trimmed-mean(beta={})", self.beta)
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        check_updates(global, updates)?;
        let n = updates.len();
        let cut = (self.beta * n as f64).floor() as usize;
        let mut out = ParamMap::new();
        for (name, tensor) in global.iter() {
            let columns: Vec<&[f32]> = updates
                .iter()
                .map(|u| u.params.get(name).expect("checked names").values())
                .collect();
            let values = (0..tensor.len())
                .map(|i| {
                    let mut column: Vec<f64> = columns.iter().map(|c| f64::from(c[i])).collect();
                    column.sort_by(f64::total_cmp);
                    let kept = &column[cut..n - cut];
                    (kept.iter().sum::<f64>() / kept.len() as f64) as f32
                })
                .collect();
            out.insert(name, HostTensor::new(tensor.shape().to_vec(), values)?);
        }
        Ok(out)
    }
}
