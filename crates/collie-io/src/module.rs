//! Moving named host tensors into and out of a Burn module, by parameter path.
//!
//! Parameter paths are the module's field names joined with dots (`layers.3.attn.q_proj.weight`).
//! A model's state-dict adapter turns a path into a checkpoint key plus a conversion
//! ([`Binding`]); [`load_module`] does the rest: shape checks against the config-built module,
//! errors that name key and parameter, and no allocation of the random initial weights (lazy
//! parameters are replaced before they are ever materialized).

use std::collections::BTreeSet;
use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::{IoError, Result};

/// An `f32` tensor in host memory, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from its parts. `data.len()` must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }

    /// Transposes a 2-D tensor (`[r, c]` → `[c, r]`).
    pub fn transpose(self) -> Self {
        assert_eq!(self.shape.len(), 2, "transpose needs a 2-D tensor");
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        HostTensor::new(vec![c, r], out)
    }

    /// Index `ranges` of dimension `dim` (0, or 1 of a 2-D tensor), concatenated along it.
    pub fn block(&self, dim: usize, ranges: &[Range<usize>]) -> Self {
        let cols = if self.shape.len() == 2 {
            self.shape[1]
        } else {
            1
        };
        let rows = self.shape[0];
        let kept: usize = ranges.iter().map(|r| r.len()).sum();
        let mut data = Vec::with_capacity(kept * if dim == 0 { cols } else { rows });
        let mut shape = self.shape.clone();
        shape[dim] = kept;
        if dim == 0 {
            for r in ranges {
                data.extend_from_slice(&self.data[r.start * cols..r.end * cols]);
            }
        } else {
            for row in self.data.chunks_exact(cols) {
                for r in ranges {
                    data.extend_from_slice(&row[r.clone()]);
                }
            }
        }
        HostTensor::new(shape, data)
    }

    /// Copies a device tensor to the host as `f32`.
    pub fn from_tensor<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Self {
        let shape = tensor.dims().to_vec();
        HostTensor::new(shape, collie_core::host::to_host(tensor))
    }

    /// Uploads to `device`.
    pub fn to_tensor<B: Backend, const D: usize>(self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(self.data, self.shape), device)
    }
}

/// A checkpoint that hands out tensors by key.
pub trait TensorSource {
    /// Human-readable name for error messages (usually the path).
    fn describe(&self) -> String;
    /// Every key in the checkpoint.
    fn keys(&self) -> Vec<String>;
    /// The shape of `key` without reading its data, or `None` if absent.
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    /// Reads and converts `key` to `f32`.
    fn read(&self, key: &str) -> Result<HostTensor>;
    /// Whether [`TensorSource::read`] of `key` (which exists) can succeed: checked when the read
    /// itself is deferred ([`load_module_lazy`]), so a bad file fails at load, naming the key.
    fn check(&self, key: &str) -> Result<()> {
        let _ = key;
        Ok(())
    }
    /// Whether [`TensorSource::read_block`] reads parts of tensors (the default reads them
    /// whole and cuts).
    fn reads_blocks(&self) -> bool {
        false
    }
    /// Index `ranges` of dimension `dim` of a 1-D or 2-D `key`, concatenated along it (the rows
    /// or columns that tensor parallelism keeps), as `f32`.
    fn read_block(&self, key: &str, dim: usize, ranges: &[Range<usize>]) -> Result<HostTensor> {
        let whole = self.read(key)?;
        Ok(whole.block(dim, ranges))
    }
}

/// Where a module parameter is, as the visitor sees it.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Dotted path (`layers.0.attn.q_proj.weight`).
    pub path: String,
    /// Burn's name of the struct that owns the field (`Struct:Linear`).
    pub container: String,
}

impl ParamInfo {
    /// Whether this is the weight of a [`collie_core::nn::Linear`], stored `[in, out]` here and
    /// `[out, in]` in PyTorch checkpoints.
    pub fn is_linear_weight(&self) -> bool {
        self.container == "Struct:Linear" && self.path.ends_with(".weight")
    }
}

/// How a checkpoint tensor becomes a parameter.
pub enum Convert {
    /// Copied as is.
    Identity,
    /// A 2-D transpose (PyTorch `[out, in]` ↔ our `[in, out]`).
    Transpose,
    /// Any other rearrangement (undoing llama.cpp's q/k row permutation, cutting one part out
    /// of a fused tensor), followed by an optional transpose. Its result's shape is checked.
    Custom(Box<dyn Fn(HostTensor) -> HostTensor>, bool),
    /// Read by the caller in another form (a layer's quantized blocks): key and shape (in the
    /// file's layout, transposed when `true`) are checked and the key counts as used; the
    /// parameter is left as it is.
    Elsewhere(bool),
}

/// The checkpoint key of a parameter and how to convert it.
pub struct Binding {
    /// Key in the checkpoint.
    pub key: String,
    /// Conversion into our layout.
    pub convert: Convert,
}

impl Binding {
    /// Parameter `info` stored under `key` in PyTorch's layout: linear weights `[out, in]`
    /// (transposed on the way in), everything else as is.
    pub fn torch(info: &ParamInfo, key: String) -> Self {
        let convert = if info.is_linear_weight() {
            Convert::Transpose
        } else {
            Convert::Identity
        };
        Binding { key, convert }
    }
}

struct Loader<'a, F> {
    path: Vec<(String, String)>,
    source: &'a dyn TensorSource,
    /// The same source, shared, when reads of plainly stored tensors are deferred.
    lazy: Option<SharedSource>,
    bind: F,
    used: BTreeSet<String>,
    error: Option<IoError>,
}

/// A checkpoint shared by the parameters whose reads it defers.
pub type SharedSource = std::sync::Arc<dyn TensorSource + Send + Sync>;

/// The [`ParamInfo`] of the parameter at the top of a visitor's `(field, container)` stack.
fn param_info(stack: &[(String, String)]) -> ParamInfo {
    ParamInfo {
        path: stack
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join("."),
        container: stack.last().map(|(_, c)| c.clone()).unwrap_or_default(),
    }
}

impl<B: Backend, F: FnMut(&ParamInfo) -> Option<Binding>> ModuleMapper<B> for Loader<'_, F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let info = param_info(&self.path);
        let Some(binding) = (self.bind)(&info) else {
            return param;
        };
        let expected: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        let transposed = matches!(
            binding.convert,
            Convert::Transpose | Convert::Custom(_, true) | Convert::Elsewhere(true)
        );
        let expected_in_file: Vec<usize> = if transposed {
            expected.iter().rev().copied().collect()
        } else {
            expected.clone()
        };
        let Some(found) = self.source.shape(&binding.key) else {
            self.error = Some(IoError::MissingTensor {
                key: binding.key,
                param: info.path,
                source_desc: self.source.describe(),
            });
            return param;
        };
        let source = self.source;
        let mismatch = |found: Vec<usize>| IoError::ShapeMismatch {
            key: binding.key.clone(),
            param: info.path.clone(),
            expected: expected_in_file.clone(),
            found,
            source_desc: source.describe(),
        };
        // A custom conversion may change the shape (a part of a fused tensor): its result is
        // checked below instead.
        let custom = matches!(binding.convert, Convert::Custom(..));
        if found != expected_in_file && !custom {
            self.error = Some(mismatch(found));
            return param;
        }
        if let Convert::Elsewhere(_) = binding.convert {
            self.used.insert(binding.key);
            return param;
        }
        if let (Some(lazy), false) = (&self.lazy, custom) {
            // Checked now, read when the parameter is first used: a caller that keeps only a
            // slice of it (tensor parallelism) never holds every whole tensor at once.
            if let Err(e) = lazy.check(&binding.key) {
                self.error = Some(e);
                return param;
            }
            let (source, key) = (lazy.clone(), binding.key.clone());
            self.used.insert(binding.key);
            if D <= 2 && lazy.reads_blocks() {
                collie_core::tp::offer_slices(param.id);
            }
            let id = param.id;
            let read = move |device: &B::Device, require_grad: bool| {
                // Tensor parallelism may have asked for the slice it keeps.
                let host = match collie_core::tp::take_slice(id) {
                    Some((dim, ranges)) => read_slice(&*source, &key, transposed, dim, &ranges),
                    None => source.read(&key),
                }
                .unwrap_or_else(|e| panic!("{e} (checked when the model was loaded)"));
                let host = if transposed { host.transpose() } else { host };
                let t = host.to_tensor::<B, D>(device);
                if require_grad {
                    t.require_grad()
                } else {
                    t
                }
            };
            let shape = param.lazy_shape();
            let (device, require_grad) = (param.lazy_device(), param.is_require_grad());
            return Param::uninitialized(param.id, read, device, require_grad, shape);
        }
        let host = match self.source.read(&binding.key) {
            Ok(h) => h,
            Err(e) => {
                self.error = Some(e);
                return param;
            }
        };
        let host = match binding.convert {
            Convert::Identity | Convert::Elsewhere(_) => host,
            Convert::Transpose => host.transpose(),
            Convert::Custom(f, transpose) => {
                let h = f(host);
                if h.shape != expected_in_file {
                    self.error = Some(mismatch(found));
                    return param;
                }
                if transpose {
                    h.transpose()
                } else {
                    h
                }
            }
        };
        self.used.insert(binding.key);
        let device = param.lazy_device();
        let tensor = host.to_tensor::<B, D>(&device);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Index `ranges` of dimension `dim` of a parameter read from `key` of `source`, in the file's
/// layout (a linear weight is stored `[out, in]`, the parameter `[in, out]`: `transposed`).
fn read_slice(
    source: &(dyn TensorSource + Send + Sync),
    key: &str,
    transposed: bool,
    dim: usize,
    ranges: &[Range<usize>],
) -> Result<HostTensor> {
    let file_dim = if transposed { 1 - dim } else { dim };
    source.read_block(key, file_dim, ranges)
}

/// Replaces every parameter that `bind` maps to a checkpoint key with that tensor.
///
/// Parameters `bind` returns `None` for keep their current (possibly lazy) value. Keys of the
/// checkpoint that no parameter used are logged, as transformers does with unexpected keys.
pub fn load_module<B: Backend, M: Module<B>>(
    module: M,
    source: &dyn TensorSource,
    bind: impl FnMut(&ParamInfo) -> Option<Binding>,
) -> Result<M> {
    load_with(module, source, None, bind)
}

/// [`load_module`] with the reads deferred: each parameter stored as is (or transposed) becomes
/// a lazy parameter that reads its tensor when first used; keys, shapes and dtypes are checked
/// now. A transform that reads the parameters one at a time and keeps part of each
/// (tensor-parallel sharding) thus holds one whole tensor at a time, never the whole model.
/// Parameters with a
/// custom conversion (parts of fused tensors, llama.cpp's permutations) are read now.
pub fn load_module_lazy<B: Backend, M: Module<B>>(
    module: M,
    source: SharedSource,
    bind: impl FnMut(&ParamInfo) -> Option<Binding>,
) -> Result<M> {
    load_with(module, &*source.clone(), Some(source), bind)
}

fn load_with<B: Backend, M: Module<B>>(
    module: M,
    source: &dyn TensorSource,
    lazy: Option<SharedSource>,
    bind: impl FnMut(&ParamInfo) -> Option<Binding>,
) -> Result<M> {
    let mut loader = Loader {
        path: Vec::new(),
        source,
        lazy,
        bind,
        used: BTreeSet::new(),
        error: None,
    };
    let module = module.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(e);
    }
    let unused: Vec<String> = source
        .keys()
        .into_iter()
        .filter(|k| !loader.used.contains(k))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            "{} tensors of {} were not used: {}",
            unused.len(),
            source.describe(),
            unused
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(module)
}

/// Reads every lazy parameter of `module` now (each in place, one at a time): what a loader
/// that deferred its reads ([`load_module_lazy`]) hands out once the model is in its final form.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct Materialize;
    impl<B: Backend> ModuleVisitor<B> for Materialize {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            param.val();
        }
    }
    module.visit(&mut Materialize);
}

/// Every float parameter of `module` with its path, copied to the host.
pub fn collect_params<B: Backend, M: Module<B>>(module: &M) -> Vec<(ParamInfo, HostTensor)> {
    lazy_params(module)
        .into_iter()
        .map(|(info, t)| (info, t.read()))
        .collect()
}

/// Every float parameter of `module` with its path, in the module's layout, read only when
/// asked. A clone of a lazy parameter is lazy too: reading it leaves the module unread.
fn lazy_params<B: Backend, M: Module<B>>(module: &M) -> Vec<(ParamInfo, LazyTensor)> {
    struct Lazy<B: Backend> {
        path: Vec<(String, String)>,
        out: Vec<(ParamInfo, LazyTensor)>,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: Backend> ModuleVisitor<B> for Lazy<B> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path
                .push((name.to_string(), container_type.to_string()));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let info = param_info(&self.path);
            let shape = param.lazy_shape().dims::<D>().to_vec();
            let param = param.clone();
            let read = move || HostTensor::from_tensor(param.clone().val());
            let tensor = LazyTensor {
                name: info.path.clone(),
                shape,
                read: Box::new(read),
            };
            self.out.push((info, tensor));
        }
    }
    let mut v = Lazy::<B> {
        path: Vec::new(),
        out: Vec::new(),
        _b: std::marker::PhantomData,
    };
    module.visit(&mut v);
    v.out
}

/// Every parameter of `module` that `key` names (given its path), under that key, in PyTorch's
/// layout (linear weights transposed to `[out, in]`): the state dict an HF checkpoint stores.
pub fn torch_state_dict<B: Backend, M: Module<B>>(
    module: &M,
    key: impl Fn(&str) -> Option<String>,
) -> Vec<(String, HostTensor)> {
    torch_state_lazy(module, key)
        .into_iter()
        .map(|t| {
            let value = t.read();
            (t.name, value)
        })
        .collect()
}

/// One tensor of a state dict, read only when asked ([`torch_state_lazy`]).
pub struct LazyTensor {
    /// Key in the checkpoint.
    pub name: String,
    /// Shape in the checkpoint's layout.
    pub shape: Vec<usize>,
    read: Box<dyn Fn() -> HostTensor>,
}

impl LazyTensor {
    /// Reads (and converts) the tensor: a lazy parameter is read from its file each time and
    /// not kept, so a writer that asks for one tensor at a time holds one tensor at a time.
    pub fn read(&self) -> HostTensor {
        (self.read)()
    }
}

/// [`torch_state_dict`] without reading anything yet: each entry reads its parameter when
/// asked (a model loaded lazily is streamed from its files, never held whole).
pub fn torch_state_lazy<B: Backend, M: Module<B>>(
    module: &M,
    key: impl Fn(&str) -> Option<String>,
) -> Vec<LazyTensor> {
    lazy_params(module)
        .into_iter()
        .filter_map(|(info, t)| {
            let name = key(&info.path)?;
            if !info.is_linear_weight() {
                return Some(LazyTensor { name, ..t });
            }
            let LazyTensor {
                mut shape, read, ..
            } = t;
            shape.reverse();
            Some(LazyTensor {
                name,
                shape,
                read: Box::new(move || read().transpose()),
            })
        })
        .collect()
}
