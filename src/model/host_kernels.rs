//! What devft's hand-written CPU kernels ([`super::cross_entropy`], [`super::quantised`])
//! share: telling whether a tensor lives on burn's flex backend, and moving `f32` values
//! between flex tensors and host slices without copies where flex allows.

#[cfg(feature = "flex")]
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "flex")]
use burn::backend::{DispatchDevice, Flex};
use burn::tensor::{DType, Device};
#[cfg(feature = "flex")]
use burn::tensor::{Shape, TensorData};

/// Whether `device` is flex's, with or without autodiff, and `dtype` is `f32`: the case the
/// kernels handle (other backends keep burn's own ops).
#[cfg(feature = "flex")]
pub(crate) fn runs_on_flex(device: &Device, dtype: DType) -> bool {
    // Other backends' variants exist only with their features.
    #[allow(unreachable_patterns)]
    let flex = match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(device) => {
            matches!(device.clone().inner(), DispatchDevice::Flex(_))
        }
        _ => false,
    };
    flex && dtype == DType::F32
}

/// Without the flex feature: never.
#[cfg(not(feature = "flex"))]
pub(crate) fn runs_on_flex(_: &Device, _: DType) -> bool {
    false
}

/// The values of a contiguous `f32` flex tensor.
#[cfg(feature = "flex")]
pub(crate) fn values(tensor: &FloatTensor<Flex>) -> &[f32] {
    tensor.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// A flex tensor holding `values` in row-major `shape`.
#[cfg(feature = "flex")]
pub(crate) fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FloatTensor<Flex> {
    FloatTensor::<Flex>::from_data(TensorData::new(values, shape.into()))
}
