//! Aggregators by name, for configs and command lines.

use crate::aggregate::{
    Aggregator, Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedSaLora,
    FedYogi, FfaLora, Flora, Krum, TrimmedMean,
};
use crate::error::{Error, Result};

/// The names [`by_name`] knows, with their parameters.
pub const AGGREGATOR_NAMES: &str = "fedavg, fedprox[:mu], fedavgm, fedadam, fedyogi, fedadagrad, \
     fedmedian, trimmed-mean[:beta], krum[:f], multi-krum:f:keep, bulyan[:f], ffa-lora, \
     fedsa-lora, flora";

/// The aggregator `spec` names: a name, optionally followed by `:`-separated parameters
/// ([`AGGREGATOR_NAMES`]); omitted parameters take the type's defaults (FedProx `mu = 0.01`,
/// trimmed mean `beta = 0.2`, Krum and Bulyan `f = 0`), the FedOpt family Flower's.
///
/// ```
/// use devft::aggregate::by_name;
///
/// assert_eq!(by_name("fedyogi")?.name(), "fedyogi(eta=0.01)");
/// assert!(by_name("bulyan:1").is_ok());
/// assert!(by_name("fedprox:-1").is_err());
/// assert!(by_name("fedsgd").is_err());
/// # Ok::<(), devft::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidArgument`] for an unknown name, a parameter that does not parse or is out
/// of the aggregator's range, or too many parameters.
pub fn by_name(spec: &str) -> Result<Box<dyn Aggregator>> {
    let mut parts = spec.split(':');
    let name = parts.next().unwrap_or_default();
    let params: Vec<&str> = parts.collect();
    let invalid = |why: String| Error::InvalidArgument(format!("aggregator `{spec}`: {why}"));
    let number = |i: usize, default: f64| -> Result<f64> {
        params.get(i).map_or(Ok(default), |p| {
            p.parse::<f64>()
                .map_err(|_| invalid(format!("`{p}` is not a number")))
        })
    };
    let count = |i: usize| -> Result<usize> {
        params.get(i).map_or(Ok(0), |p| {
            p.parse::<usize>()
                .map_err(|_| invalid(format!("`{p}` is not a count")))
        })
    };
    let most = match name {
        "fedprox" | "trimmed-mean" | "krum" | "bulyan" => 1,
        "multi-krum" => 2,
        _ => 0,
    };
    if params.len() > most {
        return Err(invalid(format!("takes at most {most} parameters")));
    }
    Ok(match name {
        "fedavg" => Box::new(FedAvg),
        "fedprox" => Box::new(FedProx::new(number(0, 0.01)?)?),
        "fedavgm" => Box::new(FedAvgM::default()),
        "fedadam" => Box::new(FedAdam::default()),
        "fedyogi" => Box::new(FedYogi::default()),
        "fedadagrad" => Box::new(FedAdagrad::default()),
        "fedmedian" => Box::new(FedMedian),
        "trimmed-mean" => Box::new(TrimmedMean::new(number(0, 0.2)?)?),
        "krum" => Box::new(Krum::new(count(0)?)),
        "multi-krum" if params.len() == 2 => Box::new(Krum::multi(count(0)?, count(1)?)),
        "multi-krum" => return Err(invalid("takes f and keep".into())),
        "bulyan" => Box::new(Bulyan::new(count(0)?)),
        "ffa-lora" => Box::new(FfaLora),
        "fedsa-lora" => Box::new(FedSaLora),
        "flora" => Box::new(Flora),
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown aggregator `{other}` ({AGGREGATOR_NAMES})"
            )));
        }
    })
}
