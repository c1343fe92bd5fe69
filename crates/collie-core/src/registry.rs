//! Per-backend custom ops, found by generic model code.
//!
//! Model code is generic over `B: Backend` and cannot name the structure of `Autodiff<I>`, so the
//! backends' custom ops (tensor-parallel collectives, flash attention, the fused kernels) are
//! stored when a backend is set up and looked up by their type: each entry's type names its
//! backend (`fn(Tensor<B, 4>, …)`, `Fused<B>`), so the value's `TypeId` is the key.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

type Registry = RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Stores `value` as the entry of its type (the last one wins).
pub(crate) fn insert<T: Any + Send + Sync>(value: T) {
    registry()
        .write()
        .expect("registry lock")
        .insert(TypeId::of::<T>(), Box::new(value));
}

/// The entry of type `T`, if one was stored.
pub(crate) fn get<T: Any + Copy>() -> Option<T> {
    registry()
        .read()
        .expect("registry lock")
        .get(&TypeId::of::<T>())
        .and_then(|v| v.downcast_ref::<T>())
        .copied()
}
