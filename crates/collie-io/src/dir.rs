//! Directories written all at once: into a staging directory beside the target, then renamed
//! into place, so a failed or interrupted write never leaves a half-written directory.

use std::path::Path;

use crate::error::IoError;

/// Writes `dir` through `write` (which fills the staging directory it is given) and renames
/// the result into place, replacing what was there. On failure the staging directory is
/// removed and `dir` is untouched.
pub fn write_dir_atomically<E: From<IoError>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| IoError::io(parent, e))?;
    let name = dir
        .file_name()
        .map_or_else(|| "dir".into(), |n| n.to_string_lossy().to_string());
    let staging = parent.join(format!(".{name}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| IoError::io(&staging, e))?;
    let result = write(&staging).and_then(|()| replace(&staging, dir).map_err(E::from));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Moves `staging` to `dir`, replacing what was there.
fn replace(staging: &Path, dir: &Path) -> Result<(), IoError> {
    if dir.exists() {
        let old = staging.with_extension("old");
        std::fs::rename(dir, &old).map_err(|e| IoError::io(dir, e))?;
        std::fs::rename(staging, dir).map_err(|e| IoError::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staging, dir).map_err(|e| IoError::io(dir, e))?;
    }
    Ok(())
}
