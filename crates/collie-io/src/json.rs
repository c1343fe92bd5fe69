//! JSON files with errors that point at the line.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{IoError, Result};

/// Reads and deserializes a JSON file; a parse or schema error names file, line and column.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| IoError::io(path, e))?;
    parse_json(&text, path)
}

/// Deserializes JSON text that came from `path` (used in error messages).
pub fn parse_json<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|e| IoError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

/// Writes `value` as pretty JSON (with a trailing newline).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| IoError::invalid(path, e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| IoError::io(path, e))
}
