//! Adapters on the wire: safetensors bytes in both directions, decoded with limits.

use crate::error::{Error, Result};
use crate::params::ParamMap;

/// Bytes of an adapter as sent over the network: its payload (tensor data, `4 x` values) and
/// the whole message (payload plus the safetensors header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireSize {
    /// Tensor data bytes.
    pub payload: u64,
    /// Whole message bytes.
    pub total: u64,
}

impl std::ops::AddAssign for WireSize {
    fn add_assign(&mut self, other: Self) {
        self.payload += other.payload;
        self.total += other.total;
    }
}

/// Encodes an adapter for sending.
///
/// # Errors
///
/// As [`ParamMap::to_safetensors_bytes`].
pub fn encode(params: &ParamMap) -> Result<(Vec<u8>, WireSize)> {
    let bytes = params.to_safetensors_bytes()?;
    let size = WireSize {
        payload: 4 * params.num_values() as u64,
        total: bytes.len() as u64,
    };
    Ok((bytes, size))
}

/// Decodes an adapter received from `sender`, refusing messages longer than `max_bytes`
/// before looking inside them. The safetensors header is validated against the real length
/// of the message, so a truncated or inflated message is rejected without allocating what it
/// declares.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for an oversized message, [`Error::MalformedSafetensors`] for a
/// malformed one, each naming the sender.
pub fn decode(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<ParamMap> {
    if bytes.len() > max_bytes {
        return Err(Error::InvalidArgument(format!(
            "{sender} sent {} bytes, more than the {max_bytes} allowed",
            bytes.len()
        )));
    }
    ParamMap::from_safetensors_bytes(bytes, sender)
}
