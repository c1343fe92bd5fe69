//! The one linear layer of collie-rs.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::adapter::Adapter;
use super::quant::{quant_matmul, QuantWeight};
use crate::dist::{copy_to_group, reduce_from_group, Group};

/// How a [`Linear`]'s weight is laid out across a tensor-parallel group.
///
/// The model code always builds `Full` layers; `collie_core::tp::shard` switches the layers its
/// plan names to `Column` or `Row` and shards their weights. The math of one shard is the plain
/// matmul below; the collectives around it are added by that transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParallelMode {
    /// The whole weight on every rank.
    #[default]
    Full,
    /// Output features split across ranks (q/k/v, gate/up projections).
    Column,
    /// Output features in `n` equal consecutive parts, each split across ranks, so that every
    /// rank holds its slice of every part, in part order (GLM's one `gate_up_proj`: the gate's
    /// outputs, then the up projection's).
    ColumnParts(usize),
    /// Input features split across ranks (o, down projections); outputs are summed.
    Row,
}

impl ParallelMode {
    /// Into how many parts a layer that splits its output features cuts them before splitting
    /// each (1 for `Column`); `None` for a layer that does not split its outputs.
    pub fn output_parts(self) -> Option<usize> {
        match self {
            ParallelMode::Column => Some(1),
            ParallelMode::ColumnParts(n) => Some(n),
            ParallelMode::Full | ParallelMode::Row => None,
        }
    }
}

/// Configuration of a [`Linear`].
#[derive(Config, Debug)]
pub struct LinearConfig {
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Whether the layer has a bias.
    #[config(default = false)]
    pub bias: bool,
    /// Standard deviation of the normal weight initialization (HF's `initializer_range`).
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// `y = x · W + b`, plus an optional adapter.
///
/// The weight is stored `[d_in, d_out]` so the forward pass is a plain matmul; HF checkpoints
/// store `[d_out, d_in]` and are transposed once when loaded.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// LoRA / IA3 slot, empty unless a PEFT transform fills it.
    pub adapter: Option<Adapter<B>>,
    /// Tensor-parallel layout of `weight`.
    pub parallel: ParallelMode,
    /// The tensor-parallel group of a `Column` / `Row` layer (Megatron's `f` before a column
    /// layer, `g` after a row layer); `None` for a whole layer.
    #[module(skip)]
    pub tp: Option<Group>,
    /// A frozen quantized base weight ([`Linear::set_quantized`]); `weight` is then empty.
    #[module(skip)]
    pub quant: Option<QuantWeight>,
}

impl LinearConfig {
    /// Builds the layer; weights are initialized lazily (on first use), so a model that is loaded
    /// from a checkpoint right after `init` never allocates its random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Linear<B> {
        let weight = Initializer::Normal {
            mean: 0.0,
            std: self.init_std,
        }
        .init([self.d_in, self.d_out], device);
        let bias = self
            .bias
            .then(|| Initializer::Zeros.init([self.d_out], device));
        Linear {
            weight,
            bias,
            adapter: None,
            parallel: ParallelMode::Full,
            tp: None,
            quant: None,
        }
    }
}

impl<B: Backend> Linear<B> {
    /// # Shapes
    /// - x: `[..., d_in]` → `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match (&self.tp, self.parallel) {
            // Every rank's shard adds its part to the replicated input's gradient.
            (Some(group), ParallelMode::Row) => return self.forward_row(x, group),
            (Some(group), mode) if mode.output_parts().is_some() => copy_to_group(x, group),
            _ => x,
        };
        let adapter = self.adapter.as_ref().filter(|a| !a.is_merged());
        let x = match adapter {
            Some(Adapter::Ia3(ia3)) if ia3.on_input => ia3.rescale(x),
            _ => x,
        };
        let mut y = match &self.quant {
            Some(w) => quant_matmul(x.clone(), w),
            None => matmul_2d(x.clone(), self.weight.val()),
        };
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze::<D>();
        }
        match adapter {
            Some(Adapter::Lora(lora)) => y + lora.delta(x),
            Some(Adapter::Ia3(ia3)) if !ia3.on_input => ia3.rescale(y),
            _ => y,
        }
    }

    /// A row-parallel shard: `x` holds this rank's input features; the partial products (and a
    /// LoRA delta through this rank's rows of A) are summed over the group, then the bias is
    /// added once.
    fn forward_row<const D: usize>(&self, x: Tensor<B, D>, group: &Group) -> Tensor<B, D> {
        let adapter = self.adapter.as_ref().filter(|a| !a.is_merged());
        let x = match adapter {
            Some(Adapter::Ia3(ia3)) if ia3.on_input => ia3.rescale(x),
            _ => x,
        };
        let mut y = matmul_2d(x.clone(), self.weight.val());
        if let Some(Adapter::Lora(lora)) = adapter {
            y = y + lora.delta(x);
        }
        let mut y = reduce_from_group(y, group);
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze::<D>();
        }
        match adapter {
            Some(Adapter::Ia3(ia3)) if !ia3.on_input => ia3.rescale(y),
            _ => y,
        }
    }

    /// `[d_in, d_out]` of the (local shard of the) weight.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quant {
            Some(w) => {
                let [d_out, d_in] = w.shape();
                [d_in, d_out]
            }
            None => self.weight.lazy_shape().dims(),
        }
    }
}

/// `x · w` for `x` of any rank, as one 2-D matmul over the flattened leading dimensions.
///
/// Going through 2-D keeps a transposed `w` (a tied LM head multiplies by the embedding's
/// transpose) a strided view: broadcasting it to rank `D` would force a copy of the whole matrix.
///
/// The product is the backend's fused one for f32 where it has one ([`crate::fused`]), else
/// Burn's.
///
/// # Shapes
/// - x: `[..., k]`, w: `[k, n]` → `[..., n]`
pub fn matmul_2d<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let k = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    // [..., k] -> [rows, k] -> [rows, n] -> [..., n]
    let x = x.reshape([rows, k]);
    let y = match crate::fused::kernels::<B>() {
        Some(f) if x.dtype() == DType::F32 && w.dtype() == DType::F32 => (f.matmul)(x, w),
        _ => x.matmul(w),
    };
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}
