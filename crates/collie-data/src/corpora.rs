//! Readers for the raw corpora the recipes build their data from.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::dataset::DataError;

/// Text of a YAML scalar (chatterbot has a few numbers and booleans among its turns).
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        Yaml::Boolean(b) => Some(if *b { "yes" } else { "no" }.to_string()),
        _ => None,
    }
}

/// Every conversation (its turns, trimmed, at least two) of every `*.yml` file of a
/// chatterbot-corpus directory, in file-name order.
pub fn chatterbot_conversations(dir: &Path) -> Result<Vec<Vec<String>>, DataError> {
    let io = |e: std::io::Error| DataError::Io {
        path: dir.to_path_buf(),
        cause: e,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| DataError::Io {
            path: file.clone(),
            cause: e,
        })?;
        let docs = YamlLoader::load_from_str(&text).map_err(|e| DataError::Dataset {
            path: file.clone(),
            message: format!("invalid YAML: {e}"),
        })?;
        let Some(convs) = docs.first().and_then(|d| d["conversations"].as_vec()) else {
            continue;
        };
        for conv in convs {
            let turns: Vec<String> = conv
                .as_vec()
                .map(|t| {
                    t.iter()
                        .filter_map(scalar)
                        .map(|s| s.trim().to_string())
                        .collect()
                })
                .unwrap_or_default();
            if turns.len() >= 2 {
                out.push(turns);
            }
        }
    }
    if out.is_empty() {
        return Err(DataError::Dataset {
            path: dir.to_path_buf(),
            message: "no conversations found in *.yml files".into(),
        });
    }
    Ok(out)
}
