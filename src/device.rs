//! Choosing a burn device by name, for the backends enabled as cargo features.
//!
//! | name | cargo feature | needs |
//! |---|---|---|
//! | `flex` | `flex` (default) | nothing: pure Rust, multi-threaded, SIMD |
//! | `ndarray` | `ndarray` | nothing (deprecated upstream) |
//! | `tch` | `tch` | libtorch 2.9.0 (`LIBTORCH` or a PyTorch install) |
//! | `wgpu` | `wgpu` | a Vulkan, Metal or DX12 driver |
//! | `cuda` | `cuda` | an NVIDIA driver and CUDA toolkit |

use burn::tensor::Device;

use crate::error::{Error, Result};

/// The names [`device_from_name`] accepts in this build.
pub fn available_backends() -> Vec<&'static str> {
    let mut names = Vec::new();
    if cfg!(feature = "flex") {
        names.push("flex");
    }
    if cfg!(feature = "ndarray") {
        names.push("ndarray");
    }
    if cfg!(feature = "tch") {
        names.push("tch");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    names
}

/// The device of the backend called `name` (see the module docs), without autodiff.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the name is unknown or its feature is not enabled.
#[allow(unreachable_code, deprecated)]
pub fn device_from_name(name: &str) -> Result<Device> {
    let not_enabled = || {
        Error::InvalidArgument(format!(
            "backend `{name}` is not enabled in this build (available: {})",
            available_backends().join(", ")
        ))
    };
    match name {
        "flex" => {
            #[cfg(feature = "flex")]
            return Ok(Device::flex());
            Err(not_enabled())
        }
        "ndarray" => {
            #[cfg(feature = "ndarray")]
            return Ok(Device::ndarray());
            Err(not_enabled())
        }
        "tch" => {
            #[cfg(feature = "tch")]
            return Ok(Device::libtorch());
            Err(not_enabled())
        }
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            return Ok(Device::wgpu(Default::default()));
            Err(not_enabled())
        }
        "cuda" => {
            #[cfg(feature = "cuda")]
            return Ok(Device::cuda(0));
            Err(not_enabled())
        }
        _ => Err(not_enabled()),
    }
}

/// The first enabled backend in the order cuda, wgpu, tch, flex, ndarray.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when no backend feature is enabled.
pub fn default_device() -> Result<Device> {
    for name in ["cuda", "wgpu", "tch", "flex", "ndarray"] {
        if let Ok(device) = device_from_name(name) {
            return Ok(device);
        }
    }
    Err(Error::InvalidArgument(
        "no backend enabled: build with one of the features flex, ndarray, tch, wgpu, cuda".into(),
    ))
}
