//! Where a teacher comes from: the path `--model` names (or the cached demo
//! teacher), and its configuration and weight source by file format (a
//! Hugging Face directory or a GGUF file).

use std::path::{Path, PathBuf};

use super::{
    ModelConfig, ModelError,
    weights::{SafetensorsSource, WeightSource},
};

/// The cache the demo teacher is fetched into by `tests/fetch-teachers.sh`:
/// `$LOGITD_CACHE`, else `$XDG_CACHE_HOME/logitd`, else `~/.cache/logitd`.
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("LOGITD_CACHE") {
        return PathBuf::from(c);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("logitd")
}

/// The demo teacher's path in the cache.
pub fn demo_teacher() -> PathBuf {
    cache_dir().join("teachers").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The model to load: `model`, or without it the cached demo teacher
/// ([`ModelError::NoModel`] when it is not cached).
pub fn resolve_model(model: Option<&Path>) -> Result<PathBuf, ModelError> {
    match model {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            let demo = demo_teacher();
            if demo.exists() { Ok(demo) } else { Err(ModelError::NoModel(demo)) }
        }
    }
}

/// The configuration and weight source of the model at `path`: a Hugging Face
/// directory (config.json, safetensors) or a `.gguf` file.
pub(super) fn open(path: &Path) -> Result<(ModelConfig, Box<dyn WeightSource>), ModelError> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let config = ModelConfig::from_hf_json(&text)?;
        let source = SafetensorsSource::open(path, config.arch.is_gemma())?;
        Ok((config, Box::new(source)))
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let (config, source) = super::gguf::open(path)?;
        Ok((config, Box::new(source)))
    } else if !path.exists() {
        Err(ModelError::MissingFile(path.to_path_buf()))
    } else {
        Err(ModelError::Config(format!(
            "{}: expected a Hugging Face model directory or a .gguf file",
            path.display()
        )))
    }
}
