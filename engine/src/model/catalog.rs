//! Models that ship with the engine, found by name, so `serve` with no `--model` answers with a
//! trained model on a fresh machine and in the image, with no download.
//!
//! A `--model` value is, in this order: [`super::builtin::BUILTIN_MODEL`] (random weights, for
//! tests and the operator's `builtin://tiny`); an existing directory; or the name of a bundled
//! model, looked up in the catalog's directories. The bundled default is [`DEFAULT_MODEL`], a 24M-parameter
//! DeepSeek-V3.2-architecture model trained by the repository's `train/` pipeline.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::builtin::is_builtin;

/// What `--model` means when it is not given.
pub const DEFAULT_MODEL: &str = "deepseek-v3.2-mini";

/// Colon-separated directories searched first for bundled models.
pub const MODELS_DIR_ENV: &str = "DEEPSEEK_ENGINE_MODELS_DIR";

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error(
        "model {name:?} is not a directory and no bundled model has that name (searched {}); \
         pass a checkpoint directory, `builtin`, or set {MODELS_DIR_ENV}",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound {
        name: String,
        searched: Vec<PathBuf>,
    },
}

/// Where bundled models are looked up, in order: `$DEEPSEEK_ENGINE_MODELS_DIR`; the installed
/// layout beside the binary (`<bin>/../share/deepseek-engine/models`, as the image has it);
/// the source tree this binary was built from (`models/`, for `cargo run` in a clone).
pub fn search_dirs(env: Option<OsString>, exe: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = env
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if let Some(prefix) = exe.and_then(Path::parent).and_then(Path::parent) {
        dirs.push(prefix.join("share/deepseek-engine/models"));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"));
    dirs
}

/// Resolves a `--model` value against the process's own search directories.
pub fn resolve(model: &str) -> Result<String, CatalogError> {
    let exe = std::env::current_exe().ok();
    resolve_in(
        model,
        &search_dirs(std::env::var_os(MODELS_DIR_ENV), exe.as_deref()),
    )
}

/// Resolves a `--model` value: `builtin` and paths pass through unchanged (a missing path gets
/// its error where config.json is read); a bare name becomes the first catalog directory that
/// holds `<name>/config.json`.
pub fn resolve_in(model: &str, dirs: &[PathBuf]) -> Result<String, CatalogError> {
    let bare_name = !model.is_empty() && !model.contains(['/', '\\']);
    if is_builtin(model) || !bare_name || Path::new(model).exists() {
        return Ok(model.to_string());
    }
    dirs.iter()
        .map(|d| d.join(model))
        .find(|d| d.join("config.json").is_file())
        .map(|d| {
            std::fs::canonicalize(&d)
                .unwrap_or(d)
                .to_string_lossy()
                .into_owned()
        })
        .ok_or_else(|| CatalogError::NotFound {
            name: model.to_string(),
            searched: dirs.to_vec(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_model_ships_in_the_source_tree() {
        let dirs = search_dirs(None, None);
        let dir = resolve_in(DEFAULT_MODEL, &dirs).unwrap();
        assert!(
            Path::new(&dir)
                .join("model.safetensors.index.json")
                .is_file(),
            "{dir}"
        );
        assert!(Path::new(&dir).join("tokenizer.json").is_file(), "{dir}");
    }

    #[test]
    fn builtin_and_paths_pass_through_and_names_search_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (first, second) = (tmp.path().join("a"), tmp.path().join("b"));
        for d in [&first, &second] {
            std::fs::create_dir_all(d.join("m")).unwrap();
            std::fs::write(d.join("m/config.json"), "{}").unwrap();
        }
        let dirs = vec![tmp.path().join("none"), first.clone(), second];
        assert_eq!(
            resolve_in("m", &dirs).unwrap(),
            std::fs::canonicalize(first.join("m"))
                .unwrap()
                .to_string_lossy()
        );
        assert_eq!(resolve_in("builtin", &dirs).unwrap(), "builtin");
        assert_eq!(
            resolve_in("builtin://tiny", &dirs).unwrap(),
            "builtin://tiny"
        );
        assert_eq!(resolve_in("/no/such/dir", &dirs).unwrap(), "/no/such/dir");
        assert_eq!(resolve_in("./m", &dirs).unwrap(), "./m");
    }

    #[test]
    fn an_unknown_name_says_where_it_looked() {
        let dirs = vec![PathBuf::from("/opt/x"), PathBuf::from("/opt/y")];
        let err = resolve_in("no-such-model", &dirs).unwrap_err().to_string();
        assert!(err.contains("\"no-such-model\""), "{err}");
        assert!(
            err.contains("/opt/x, /opt/y") && err.contains(MODELS_DIR_ENV),
            "{err}"
        );
    }

    #[test]
    fn the_environment_comes_first_and_empty_entries_are_ignored() {
        let env = std::env::join_paths(["/first", "", "/second"]).unwrap();
        let dirs = search_dirs(Some(env), Some(Path::new("/usr/local/bin/deepseek-engine")));
        assert_eq!(dirs[0], Path::new("/first"));
        assert_eq!(dirs[1], Path::new("/second"));
        assert_eq!(
            dirs[2],
            Path::new("/usr/local/share/deepseek-engine/models")
        );
        assert_eq!(dirs.len(), 4);
    }
}
